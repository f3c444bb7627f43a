"""Prompt methods (Xuan et al.'s prompt diversification), the pseudo-word text forward, and the
diversity measure; tiny randomly initialised teachers, nothing trained."""
import dataclasses
import json
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml

from clipdistill.clip_models import ClipModel, save_clip
from clipdistill.diversity import diversity_report, mean_pairwise_cosine_distance
from clipdistill.params import ParamsError, parse_params
from clipdistill.prompts import (METHODS, ContrastivePrompt, MemoryBank, MixPrompt, RandomPrompt, build_method,
                                 contrastive_prompt_loss, fit_gaussian, load_prompts, load_styles, mix_embeddings,
                                 mix_weights, save_prompts)
from clipdistill.runtime import PipelineError
from project import repo_section, tiny_clip

from clipdistill.text_encoder import (PLACEHOLDER, StyleTemplate, encode_with_pseudo_word, placeholder_position,
                                      word_embedding)

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return tiny_clip().eval().requires_grad_(False)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def params(**kw):
    return repo_section("prompts", **kw)


def single_token(teacher, word):
    assert len(teacher._tokenizer.encode(word)) == 1, f"'{word}' is not one BPE token"
    return word


# ---------------------------------------------------------------- the pseudo-word forward

def check_forward_matches_encode_text(teacher):
    words = [single_token(teacher, w) for w in ("watercolor", "neon", "mosaic")]
    enc = StyleTemplate(teacher, "a {style} style of a {class}", CLASSES)
    s_star = torch.stack([enc.word(w) for w in words])
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        ours = enc.encode(s_star, labels)
        ref = F.normalize(teacher.model.encode_text(teacher.tokenize(
            [f"a {w} style of a {CLASSES[y]}" for w, y in zip(words, labels.tolist())])), dim=-1)
        plain = ["a photo of a circle", "a star"]
        no_star = encode_with_pseudo_word(teacher.model, teacher.tokenize(plain), normalize=False)
        ref_plain = teacher.model.encode_text(teacher.tokenize(plain))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(no_star, ref_plain, atol=1e-5)
    # a different S* gives a different feature: the substitution is really used
    assert not torch.allclose(ours[0], enc.encode(s_star[1:2], labels[:1])[0], atol=1e-3)


def test_forward_equals_encode_text_on_embedded_teacher(teacher):
    check_forward_matches_encode_text(teacher)


def test_forward_equals_encode_text_on_open_clip_vit_b32():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval().requires_grad_(False)
    check_forward_matches_encode_text(ClipModel(model, 224, model.context_length, {"kind": "test"}))


def test_placeholder_is_one_token_at_the_style_slot(teacher):
    tok = teacher._tokenizer
    assert len(tok.encode(PLACEHOLDER)) == 1
    assert placeholder_position(tok, "a {style} style of a {class}") == 2
    assert placeholder_position(tok, "an oil painting in {style} of a {class}") == 5
    enc = StyleTemplate(teacher, "a {class} drawn in {style} style", ["crescent moon", "star"])
    assert enc.positions.tolist() == [6, 5]  # the class name comes first and its length varies
    assert (enc.tokens[[0, 1], enc.positions] == tok.encode(PLACEHOLDER)[0]).all()
    with pytest.raises(PipelineError, match="style slot"):  # truncated away at context length 16
        StyleTemplate(teacher, " ".join(["very"] * 20) + " {style} {class}", CLASSES)


def test_multi_token_word_embedding_is_the_mean_of_its_tokens(teacher):
    ids = teacher._tokenizer.encode("oil painting")
    assert len(ids) == 2
    table = teacher.model.token_embedding.weight
    assert torch.allclose(word_embedding(teacher.model, teacher._tokenizer, "oil painting"), table[ids].mean(0))


# ---------------------------------------------------------------- Mix-Prompt

def test_mix_weights_are_convex_and_uniform_for_two_styles():
    w = mix_weights(4000, 2, 1.0, gen())
    assert w.shape == (4000, 2) and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(4000), atol=1e-6)
    # k = 2, alpha = 1: lambda ~ U(0, 1), mean 1/2 and variance 1/12
    assert w[:, 0].mean().item() == pytest.approx(0.5, abs=0.02)
    assert w[:, 0].var().item() == pytest.approx(1 / 12, abs=0.01)
    w4 = mix_weights(500, 4, 0.3, gen())
    assert (w4 >= 0).all() and torch.allclose(w4.sum(1), torch.ones(500), atol=1e-6)
    assert torch.equal(mix_weights(10, 3, 1.0, gen(5)), mix_weights(10, 3, 1.0, gen(5)))


def test_mix_with_weight_one_is_the_pure_style():
    styles = torch.randn(5, 8, generator=gen())
    index = torch.tensor([[1, 3], [4, 0]])
    assert torch.equal(mix_embeddings(styles, index, torch.tensor([[1.0, 0.0], [1.0, 0.0]])), styles[[1, 4]])
    assert torch.equal(mix_embeddings(styles, index, torch.tensor([[0.0, 1.0], [0.0, 1.0]])), styles[[3, 0]])
    half = mix_embeddings(styles, index, torch.full((2, 2), 0.5))
    assert torch.allclose(half[0], (styles[1] + styles[3]) / 2)


def test_mix_prompt_with_one_style_is_the_real_style_prompt(teacher, tmp_path):
    """k = 1 puts weight 1 on one dictionary word: the feature is encode_text of the real prompt."""
    (tmp_path / "styles.txt").write_text("# single-token styles\nwatercolor\nneon  # glowing\n\nmosaic\n")
    ps = MixPrompt(params(mix=repo_section("prompts.mix", styles_file=str(tmp_path / "styles.txt"), k=1))).generate(
        teacher, CLASSES, 4, gen())
    for i in range(len(ps.labels)):
        style, weight = ps.descriptions[i].split()
        assert style in {"watercolor", "neon", "mosaic"} and weight == "1.00"
        ref = teacher.encode_text([f"a {style} style of a {ps.classes[i]}"])[0]
        assert torch.allclose(ps.features[i], ref, atol=1e-5)
    assert ps.texts[0].startswith("a [") and ps.texts[0].endswith(f"style of a {CLASSES[0]}")


def test_mix_prompt_descriptions_name_two_styles_with_weights(teacher):
    ps = MixPrompt(params()).generate(teacher, CLASSES, 5, gen())
    styles = set(load_styles())
    for d in ps.descriptions:
        (a, wa), (b, wb) = [part.rsplit(" ", 1) for part in d.split(" + ")]
        assert a in styles and b in styles and a != b
        assert float(wa) >= float(wb) and float(wa) + float(wb) == pytest.approx(1.0, abs=0.011)


def test_shipped_style_dictionary_has_86_unique_styles():
    styles = load_styles()
    assert len(styles) == 86 and len(set(styles)) == 86
    assert {"watercolor", "oil painting", "pixel art", "cubism", "neon"} <= set(styles)


# ---------------------------------------------------------------- Random-Prompt

def test_random_prompt_samples_follow_the_fitted_gaussian(teacher):
    ps = RandomPrompt(params()).generate(teacher, CLASSES, 1500, gen())
    table = teacher.model.token_embedding.weight
    mean, std = table.mean(0), table.std(0)
    s = ps.s_star
    assert s.shape == (4500, table.shape[1])
    assert ((s.mean(0) - mean).abs() / std).max() < 0.1          # 4500 draws: sampling error ~0.015 std
    assert ((s.std(0) / std) - 1).abs().max() < 0.08
    corr = torch.corrcoef(s.t()) - torch.eye(s.shape[1])
    assert corr.abs().max() < 0.1                                # dimensions drawn independently
    wide = RandomPrompt(params(random=repo_section("prompts.random", scale=2.0))).generate(teacher, CLASSES, 500, gen())
    assert (wide.s_star.std(0) / std).mean().item() == pytest.approx(2.0, rel=0.05)
    assert ps.descriptions[17] == "random #17" and ps.texts[0] == "a [random #0] style of a circle"


def test_fit_gaussian_on_a_known_table():
    table = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    mean, std = fit_gaussian(table)
    assert torch.allclose(mean, torch.tensor([2.0, 1.0])) and torch.allclose(std, torch.tensor([2.0, 0.0]))


# ---------------------------------------------------------------- Contrastive-Prompt

def test_contrastive_loss_hand_formula():
    g = gen()
    f = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    c = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    bank = F.normalize(torch.randn(2, 4, generator=g), dim=-1)
    t, w = 0.5, 0.3
    hand = 0.0
    for i in range(3):  # each prompt is its own positive (cos 1); the others and the bank are negatives
        negs = [torch.dot(f[i], f[j]) for j in range(3) if j != i] + [torch.dot(f[i], b) for b in bank]
        denom = torch.exp(torch.tensor(1 / t)) + sum(torch.exp(n / t) for n in negs)
        hand += -torch.log(torch.exp(torch.tensor(1 / t)) / denom) + w * (1 - torch.dot(f[i], c[i]))
    assert contrastive_prompt_loss(f, c, bank, t, w).item() == pytest.approx(hand.item() / 3, rel=1e-5)
    # one prompt, no bank: no negatives, InfoNCE is 0; on its content feature the content term is 0 too
    assert contrastive_prompt_loss(f[:1], f[:1], torch.empty(0, 4), t, w).item() == pytest.approx(0.0, abs=1e-6)
    # negatives far away (cos -1) make InfoNCE vanish: it only pushes apart, it never pulls
    far = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert contrastive_prompt_loss(far, far, torch.empty(0, 2), 0.05, 0.0).item() == pytest.approx(0.0, abs=1e-12)


def test_memory_bank_is_a_fifo_of_fixed_size():
    bank = MemoryBank(5, 2)
    bank.push(torch.arange(6.0).view(3, 2))
    assert bank.features.shape == (3, 2)
    bank.push(torch.arange(6.0, 14.0).view(4, 2))
    assert torch.equal(bank.features, torch.arange(4.0, 14.0).view(5, 2))  # the oldest two rows left
    bank.push(torch.full((7, 2), -1.0))
    assert torch.equal(bank.features, torch.full((5, 2), -1.0))
    empty = MemoryBank(0, 2)
    empty.push(torch.ones(3, 2))
    assert empty.features.shape == (0, 2)


def test_contrastive_prompt_loss_falls_as_prompts_spread_apart(teacher):
    cp = repo_section("prompts.contrastive", steps=40, lr=0.001, batch_size=12, bank_size=8)
    method = ContrastivePrompt(params(contrastive=cp))
    ps = method.generate(teacher, CLASSES, 8, gen())
    start = ContrastivePrompt(params(contrastive=dataclasses.replace(cp, steps=0))).generate(teacher, CLASSES, 8, gen())
    assert len(method.losses) == 2 and all(len(h) == 40 for h in method.losses)
    for history in method.losses:
        assert history[-1] < 0.8 * history[0]
    before = mean_pairwise_cosine_distance(start.features, start.labels)
    after = mean_pairwise_cosine_distance(ps.features, ps.labels)
    assert all(after[c] > before[c] for c in before)
    # the class survives: prompts are nearest their own class content feature, more often than at the start
    content = teacher.encode_text(CLASSES)
    hits = [((s.features @ content.t()).argmax(1) == torch.tensor(s.labels)).float().mean().item() for s in (start, ps)]
    assert hits[1] >= max(hits[0], 0.9)
    assert ps.descriptions[3] == "contrastive #3"


def test_contrastive_prompt_leaves_the_teacher_untouched():
    torch.manual_seed(1)
    t = tiny_clip(embed_dim=8, vision_width=4, text_width=16).eval()  # weights still require grad
    before = {k: v.clone() for k, v in t.state_dict().items()}
    ContrastivePrompt(params(contrastive=repo_section("prompts.contrastive", steps=3, batch_size=4))).generate(t, CLASSES, 2, gen())
    assert all(p.grad is None for p in t.parameters())
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


# ---------------------------------------------------------------- every method

FAST = params(contrastive=repo_section("prompts.contrastive", steps=3, batch_size=5))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_are_balanced_deterministic_and_features_match_s_star(teacher, method):
    m = build_method(dataclasses.replace(FAST, method=method))
    a = m.generate(teacher, CLASSES, 4, gen(3))
    b = build_method(dataclasses.replace(FAST, method=method)).generate(teacher, CLASSES, 4, gen(3))
    c = build_method(dataclasses.replace(FAST, method=method)).generate(teacher, CLASSES, 4, gen(4))
    assert a.labels == [0] * 4 + [1] * 4 + [2] * 4 and a.classes[4] == "square" and a.method == method
    assert a.features.shape == (12, 16) and torch.allclose(a.features.norm(dim=1), torch.ones(12), atol=1e-5)
    assert torch.equal(a.features, b.features) and a.texts == b.texts
    assert len(a.texts) == len(a.descriptions) == 12
    if method == "vanilla":
        assert a.s_star is None
        assert torch.allclose(a.features[0], teacher.encode_text(["a photo of a circle"])[0], atol=1e-6)
        return
    assert a.s_star.shape == (12, 32) and not torch.equal(a.features, c.features)
    # synthesis conditions on exactly the feature of the stored S*
    enc = StyleTemplate(teacher, FAST.style_template, CLASSES)
    with torch.no_grad():
        assert torch.allclose(enc.encode(a.s_star, torch.tensor(a.labels)), a.features, atol=1e-5)
    assert len(set(a.texts)) == 12  # every prompt is its own


def test_save_and_load_round_trip(teacher, tmp_path):
    ps = RandomPrompt(params()).generate(teacher, CLASSES, 2, gen())
    save_prompts(ps, tmp_path)
    table, feats = load_prompts(tmp_path)
    assert list(table.columns) == ["prompt_id", "class", "label", "method", "description", "text"]
    assert table["text"].tolist() == ps.texts and torch.equal(feats, ps.features)
    assert torch.equal(torch.load(tmp_path / "features.pt", weights_only=True)["s_star"], ps.s_star)


# ---------------------------------------------------------------- errors and params

def raw():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_parse_with_nested_prompt_sections():
    p = parse_params(raw())
    assert p.prompts.mix.k == 2 and p.prompts.contrastive.bank_size == 256
    assert isinstance(p.prompts.contrastive.lr, float)


@pytest.mark.parametrize("mutate, needle", [
    (lambda r: r["prompts"].update(method="fancy"), "prompts.method"),
    (lambda r: r["prompts"]["mix"].update(bogus=1), "prompts.mix.bogus"),
    (lambda r: r["prompts"]["contrastive"].update(temprature=0.1), "prompts.contrastive.temprature"),
    (lambda r: r["prompts"]["contrastive"].update(temperature=0), "prompts.contrastive.temperature"),
    (lambda r: r["prompts"]["contrastive"].update(bank_size=-1), "prompts.contrastive.bank_size"),
    (lambda r: r["prompts"]["mix"].update(k=0), "prompts.mix.k"),
    (lambda r: r["prompts"].update(mix=None), "prompts.mix"),
    (lambda r: r["prompts"].update(style_template="a {} style of a {class}"), "prompts.style_template"),
    (lambda r: r["prompts"]["contrastive"].update(content_template="plain"), "prompts.contrastive.content_template"),
])
def test_bad_prompt_params_fail_with_one_line(mutate, needle):
    r = raw()
    mutate(r)
    with pytest.raises(ParamsError) as err:
        parse_params(r)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_method_fails_with_one_line():
    r = yaml.safe_load((ROOT / "params.yaml").read_text())
    r["prompts"]["method"] = "fancy"
    with pytest.raises(ParamsError) as err:
        parse_params(r)
    msg = str(err.value)
    assert "'prompts.method' is 'fancy'; choose one of " + ", ".join(METHODS) in msg and "\n" not in msg


def test_empty_or_missing_style_dictionary_fails_with_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n   \n")
    for path, needle in [(empty, "is empty"), (tmp_path / "missing.txt", "not found")]:
        with pytest.raises(PipelineError) as err:
            MixPrompt(params(mix=repo_section("prompts.mix", styles_file=str(path))))
        msg = str(err.value)
        assert needle in msg and str(path) in msg and "\n" not in msg
    dup = tmp_path / "dup.txt"
    dup.write_text("neon\nmosaic\nneon\n")
    with pytest.raises(PipelineError, match="neon more than once"):
        load_styles(dup)
    (tmp_path / "two.txt").write_text("neon\nmosaic\n")
    with pytest.raises(PipelineError, match="prompts.mix.k = 3"):
        MixPrompt(params(mix=repo_section("prompts.mix", styles_file=str(tmp_path / "two.txt"), k=3)))


# ---------------------------------------------------------------- diversity

def test_mean_pairwise_cosine_distance_hand_formula():
    f = torch.randn(7, 5, generator=gen())
    labels = [0, 0, 0, 1, 1, 1, 1]
    got = mean_pairwise_cosine_distance(f, labels)
    for c in (0, 1):
        idx = [i for i, y in enumerate(labels) if y == c]
        pairs = [1 - F.cosine_similarity(f[i], f[j], dim=0) for i in idx for j in idx if i != j]
        assert got[c] == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-6)
    same = mean_pairwise_cosine_distance(torch.ones(4, 3), [2, 2, 2, 5])
    assert same == {2: 0.0, 5: 0.0}  # identical features, and a class of one: no spread
    opposite = mean_pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), [0, 0])
    assert opposite[0] == pytest.approx(2.0)
    report = diversity_report(f, labels, ["circle", "square"])
    assert report == {"mean": pytest.approx((got[0] + got[1]) / 2), "circle": got[0], "square": got[1]}


def test_prompts_stage_writes_metrics(teacher, tmp_path, monkeypatch):
    r = yaml.safe_load((ROOT / "tests" / "tiny_params.yaml").read_text())
    r["world"]["classes"] = CLASSES
    r["prompts"].update(method="mix", per_class=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(r))
    save_clip(teacher, tmp_path / "clip.pt")
    sys.path.insert(0, str(ROOT / "stages"))
    monkeypatch.setattr(sys, "argv", ["prompts.py", "--params", str(tmp_path / "params.yaml"),
                                      "--teacher", str(tmp_path / "clip.pt"), "--out", str(tmp_path / "prompts")])
    import prompts as stage  # stages/prompts.py
    try:
        stage.main()
    finally:
        sys.path.remove(str(ROOT / "stages"))
        sys.modules.pop("prompts", None)
    metrics = json.loads((tmp_path / "prompts" / "metrics.json").read_text())["prompt_diversity"]
    assert set(metrics) == {"mean", *CLASSES} and 0 < metrics["mean"] < 2
    table, feats = load_prompts(tmp_path / "prompts")
    assert len(table) == 9 and feats.shape == (9, 16) and set(table["method"]) == {"mix"}


def test_random_prompt_fit_words_fits_only_those_rows(tmp_path):
    from clipdistill.prompts import RandomPrompt, fit_gaussian

    words = tmp_path / "words.txt"
    words.write_text("neon\nmosaic\n")
    teacher = tiny_clip(image_size=32)
    method = RandomPrompt(repo_section("prompts", random=repo_section("prompts.random", fit_words=str(words))))
    ids = sorted({i for w in ("neon", "mosaic") for i in teacher._tokenizer.encode(w)})
    mean, std = fit_gaussian(teacher.model.token_embedding.weight[torch.tensor(ids)])
    s = method.generate(teacher, ["circle", "star"], 2000, torch.Generator().manual_seed(0)).s_star
    assert torch.allclose(s.mean(0), mean, atol=4 * float(std.max()) / 60)
    assert torch.allclose(s.std(0), std, rtol=0.1)


def test_class_sums_accumulated_in_batches_give_the_one_batch_distances():
    g = torch.Generator().manual_seed(3)
    f, labels = torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g).tolist()
    from clipdistill.diversity import ClassSums

    sums = ClassSums()
    for i in range(0, 30, 7):
        sums.add(f[i:i + 7], labels[i:i + 7])
    whole = mean_pairwise_cosine_distance(f, labels)
    assert sums.distances() == pytest.approx(whole, abs=1e-12)
    assert diversity_report(sums, None, ["a", "b", "c"]) == pytest.approx(diversity_report(f, labels, ["a", "b", "c"]))
