"""Prompt-learning students (PromptKD, KDPL, KDPL-CA), their losses and checkpoints, on tiny
randomly initialised CLIPs: the embedded conv-tower CLIP and a 2-layer open_clip ViT (VPT-deep)."""
import pytest
import torch
import torch.nn.functional as F

from project import tiny_clip as embedded_clip

from clipdistill.clip_models import ClipModel, build_clip
from clipdistill.losses import get_loss, kd_kl, promptkd_loss, symmetric_kl
from clipdistill.prompt_students import (ConvPrompts, KDPLStudent, PromptKDStudent, VitPrompts, class_agnostic_logits,
                                         load_classnames, select_topk_classes)
from clipdistill.runtime import PipelineError
from clipdistill.students import CnnStudent, load_student, save_student
from clipdistill.training import distill

CLASSES = ["circle", "triangle", "square", "star", "heart"]
TEACHER_DIM = 12
VIT_CONFIG = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_clip(tower: str) -> ClipModel:
    """A fresh random small CLIP: 'conv' = the embedded ConvImageTower one, 'vit' = open_clip ViT."""
    torch.manual_seed(0)
    if tower == "conv":
        return embedded_clip().eval()
    return ClipModel(build_clip(VIT_CONFIG), 32, 16, {"kind": "embedded", "config": VIT_CONFIG}).eval()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def class_vectors(n=len(CLASSES)):
    return F.normalize(torch.randn(n, TEACHER_DIM, generator=gen(1)), dim=-1)


def images(n=4, size=20, seed=2):
    return torch.rand(n, 3, size, size, generator=gen(seed))


def promptkd(tower, n_prompts=2, depth=2):
    return PromptKDStudent(tiny_clip(tower), class_vectors(), 100.0, n_prompts=n_prompts, prompt_depth=depth,
                           generator=gen())


KDPL = {"n_ctx": 4, "ctx_init": "a photo of a", "n_prompts": 0, "prompt_depth": 0}  # text context only


def kdpl(tower, **kw):
    return KDPLStudent(tiny_clip(tower), CLASSES, generator=gen(), **{**KDPL, **kw})


def nudge(student):
    """Move the student off its initial state: trainable params and projector BN statistics."""
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen(3)))
    student.train()
    student(images(4))
    student.eval()


# ---------------------------------------------------------------- losses (PromptKD's and KDPL's formulas)

def test_symmetric_kl_properties_and_hand_formula():
    s, t = torch.randn(6, 5, generator=gen(4)), torch.randn(6, 5, generator=gen(5))
    loss = symmetric_kl(s, t)
    assert loss > 0
    assert torch.allclose(loss, symmetric_kl(t, s), atol=1e-6)
    assert symmetric_kl(s, s).abs() < 1e-6
    assert symmetric_kl(s, s + 3.0).abs() < 1e-6  # equal distributions (softmax is shift-invariant)
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    hand = 0
    for b in range(6):
        for c in range(5):
            hand += 0.5 * p_t[b, c] * torch.log(p_t[b, c] / p_s[b, c])
            hand += 0.5 * p_s[b, c] * torch.log(p_s[b, c] / p_t[b, c])
    assert torch.allclose(loss, hand / 6, atol=1e-6)
    s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_()
    symmetric_kl(s_, t_).backward()
    assert t_.grad is None and s_.grad is not None and s_.grad.abs().sum() > 0


def test_promptkd_loss_is_the_summed_kl_over_batch_times_classes():
    s, t = torch.randn(4, 7, generator=gen(6)), torch.randn(4, 7, generator=gen(7))
    for temp, weight in [(1.0, 1000.0), (2.0, 200.0)]:
        summed_kl = F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1), reduction="sum")
        loss = promptkd_loss(s, t, temp, kd_weight=weight)
        assert torch.allclose(loss * 4 * 7 / weight, temp ** 2 * summed_kl, atol=1e-6)
        # = Hinton KD's batch mean divided by the number of classes
        assert torch.allclose(loss / weight * 7, kd_kl(s, t, temp), atol=1e-6)
    assert promptkd_loss(s, s, 1.0, kd_weight=1000.0).abs() < 1e-4
    s_, t_ = s.clone().requires_grad_(), t.clone().requires_grad_()
    promptkd_loss(s_, t_, 1.0, kd_weight=1000.0).backward()
    assert t_.grad is None and s_.grad.abs().sum() > 0


# ---------------------------------------------------------------- KDPL-CA selection (check 2)

def test_select_topk_is_the_top_k_of_the_batch_mean_teacher_probabilities():
    probs = torch.randn(8, 30, generator=gen(8)).mul(3).softmax(-1)
    ids = select_topk_classes(probs, 6)
    assert ids.dtype == torch.long and ids.tolist() == sorted(ids.tolist())
    mean = probs.mean(0)
    assert set(ids.tolist()) == set(mean.argsort(descending=True)[:6].tolist())
    assert mean[ids].min() >= mean[[i for i in range(30) if i not in ids.tolist()]].max()
    # the batch mean, not any single image's ranking, decides
    probs2 = torch.full((2, 4), 0.01)
    probs2[0] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    probs2[1] = torch.tensor([0.01, 0.50, 0.48, 0.01])
    assert select_topk_classes(probs2, 2).tolist() == [0, 1]
    assert torch.equal(select_topk_classes(probs, 30), torch.arange(30))
    for bad in (0, 31):
        with pytest.raises(ValueError, match="top-k"):
            select_topk_classes(probs, bad)


def test_class_agnostic_kdpl_with_all_classes_equals_plain_kdpl():
    student = kdpl("conv").eval()
    x = images(3)
    teacher_logits = 100 * F.normalize(torch.randn(3, len(CLASSES), generator=gen(9)), dim=-1)
    with torch.no_grad():
        s, t, ids = class_agnostic_logits(student, x, teacher_logits, len(CLASSES))
        plain = student(x)
    assert torch.equal(ids, torch.arange(len(CLASSES)))
    assert torch.equal(t, teacher_logits) and torch.allclose(s, plain, atol=1e-5)
    assert torch.allclose(symmetric_kl(s, t), symmetric_kl(plain, teacher_logits), atol=1e-6)
    # with K < C both sides are the selected columns; the student encodes only those prompts
    with torch.no_grad():
        s3, t3, ids3 = class_agnostic_logits(student, x, teacher_logits, 3)
    assert torch.equal(ids3, select_topk_classes(teacher_logits.softmax(-1), 3))
    assert torch.equal(t3, teacher_logits[:, ids3]) and torch.allclose(s3, plain[:, ids3], atol=1e-5)


# ---------------------------------------------------------------- PromptKD

@pytest.mark.parametrize("tower", ["conv", "vit"])
def test_promptkd_without_prompts_is_the_plain_clip_image_tower(tower):
    clip = tiny_clip(tower)
    student = PromptKDStudent(clip, class_vectors(), 100.0, n_prompts=4, prompt_depth=0).eval()
    x = images(2, size=24)
    with torch.no_grad():
        ours = F.normalize(student.encoder(student.preprocess(x)), dim=-1)
        assert torch.allclose(ours, clip.encode_image(x), atol=1e-6)
        # logits are scaled cosines against the stored vectors, for inputs of any size
        logits = student(x)
        assert torch.allclose(logits, 100.0 * student.image_features(x) @ student.class_vectors.t(), atol=1e-5)
        # the feature losses' view: the same logits and the projector's output before normalising
        out = student(x, features=True)
        assert torch.equal(out.logits, logits)
        assert torch.allclose(F.normalize(out.features, dim=-1), student.image_features(x), atol=1e-6)
    assert logits.shape == (2, len(CLASSES)) and logits.abs().max() <= 100.0 + 1e-4
    assert isinstance(student.encoder, ConvPrompts if tower == "conv" else VitPrompts)


def test_vit_prompts_mirror_open_clip_modules():
    """Layer-0 prompts through open_clip's own _embeds, Transformer.forward and _pool."""
    clip = tiny_clip("vit")
    enc = VitPrompts(clip.model.visual, n_prompts=3, depth=1, generator=gen()).eval()
    v = clip.model.visual
    x = clip.preprocess(images(2))
    with torch.no_grad():
        tokens = v._embeds(x)  # [B, 1 + grid**2, W], after ln_pre
        prompts = v.ln_pre(enc.prompts[0]).expand(2, -1, -1)  # LayerNorm is per token
        seq = v.transformer(torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1))
        pooled, _ = v._pool(torch.cat([seq[:, :1], seq[:, 4:]], dim=1))
        assert torch.allclose(enc(x), pooled @ v.proj, atol=1e-5)
        # the prompts matter
        assert not torch.allclose(enc(x), v(x), atol=1e-4)
    with pytest.raises(ValueError, match="depth"):
        VitPrompts(v, 2, 3)


def test_conv_prompts_are_additive_maps_on_stage_inputs():
    clip = tiny_clip("conv")
    v = clip.model.visual
    enc = ConvPrompts(v, n_prompts=1, depth=1, generator=gen()).eval()
    x = clip.preprocess(images(2))
    with torch.no_grad():
        # n = 1: a per-channel shift of the tower's input
        assert torch.allclose(enc(x), v(x + enc.prompts[0]), atol=1e-5)
    deep = ConvPrompts(v, n_prompts=3, depth=4, generator=gen())
    assert [tuple(p.shape) for p in deep.prompts] == [(1, 3, 3, 3), (1, 8, 3, 3), (1, 16, 3, 3), (1, 32, 3, 3)]
    with pytest.raises(ValueError, match="depth"):
        ConvPrompts(v, 2, 5)


@pytest.mark.parametrize("tower", ["conv", "vit"])
def test_promptkd_only_prompts_and_projector_get_gradients(tower):
    student = promptkd(tower, n_prompts=2, depth=2).train()
    teacher_logits = torch.randn(4, len(CLASSES), generator=gen(10))
    promptkd_loss(student(images(4)), teacher_logits, 1.0, kd_weight=1000.0).backward()
    trained = 0
    for name, p in student.named_parameters():
        if name.startswith(("encoder.prompts", "projector.")):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            trained += 1
        else:
            assert not p.requires_grad and p.grad is None, name
    assert trained == (7 if tower == "vit" else 8)  # prompts (1 tensor | 2 maps) + 2 Linear + BN
    # every prompted layer's prompts get a gradient
    for i in range(2):
        assert student.encoder.prompts[i].grad.abs().sum() > 0 if tower == "conv" else \
            student.encoder.prompts.grad[i].abs().sum() > 0


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("tower", ["conv", "vit"])
def test_promptkd_training_keeps_class_vectors_and_frozen_tower_bit_identical(tower, optimizer):
    student = promptkd(tower)
    vectors = student.class_vectors.clone()
    frozen = {k: v.clone() for k, v in student.encoder.visual.state_dict().items()}  # BN statistics included
    prompts = [p.detach().clone() for p in student.encoder.parameters() if p.requires_grad]
    data = (torch.rand(8, 3, 16, 16, generator=gen(11)) * 255).to(torch.uint8)
    teacher_vectors = class_vectors()
    losses, _ = distill(student, lambda x: 100 * F.normalize(x.mean((2, 3)) @ torch.ones(3, TEACHER_DIM), dim=-1)
                        @ teacher_vectors.t(), data, get_loss("promptkd", 1000.0), temperature=1.0, epochs=1, batch_size=4, lr=0.01,
                        weight_decay=0.01, augment=False, generator=gen(), device=torch.device("cpu"),
                        optimizer=optimizer)
    assert len(losses) == 2
    assert torch.equal(student.class_vectors, vectors)
    assert all(torch.equal(v, frozen[k]) for k, v in student.encoder.visual.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(prompts, (p for p in student.encoder.parameters()
                                                              if p.requires_grad)))


# ---------------------------------------------------------------- KDPL

@pytest.mark.parametrize("tower", ["conv", "vit"])
def test_untrained_kdpl_student_is_zero_shot_clip(tower):
    """ctx initialised from 'a photo of a' reproduces encode_text('a photo of a {class}.')."""
    clip = tiny_clip(tower)
    student = KDPLStudent(clip, CLASSES, **KDPL).eval()
    x = images(2)
    with torch.no_grad():
        ref_txt = clip.encode_text([f"a photo of a {c}." for c in CLASSES])
        assert torch.allclose(student.text_features(), ref_txt, atol=1e-5)
        assert torch.allclose(student.image_features(x), clip.encode_image(x), atol=1e-6)
        assert torch.allclose(student(x), clip.logit_scale * clip.encode_image(x) @ ref_txt.t(), atol=1e-3)
        clip.model.logit_scale.fill_(7.0)  # exp(7) > 100: clamped as CLIP does
    assert student.logit_scale == 100.0


@pytest.mark.parametrize("tower", ["conv", "vit"])
def test_kdpl_only_context_and_visual_prompts_get_gradients(tower):
    student = kdpl(tower, n_prompts=2, prompt_depth=2).train()
    symmetric_kl(student(images(3)), torch.randn(3, len(CLASSES), generator=gen(12))).backward()
    names = []
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            names.append(name)
        else:
            assert p.grad is None, name
    assert "ctx" in names and len(names) > 1
    assert all(n.startswith("encoder.prompts") for n in names if n != "ctx")
    assert not student.clip.training  # the frozen CLIP stays in eval mode


def test_kdpl_class_names_and_context_options():
    student = kdpl("conv")
    ctx = student.ctx.detach().clone()
    student.set_classnames(["cat", "dog"])
    assert student(images(2)).shape == (2, 2) and torch.equal(student.ctx, ctx)
    assert student.tokens.shape == (2, 16)
    with pytest.raises(ValueError, match="tokens"):
        KDPLStudent(tiny_clip("conv"), CLASSES, **{**KDPL, "n_ctx": 3})
    rand = KDPLStudent(tiny_clip("conv"), CLASSES, **{**KDPL, "n_ctx": 6, "ctx_init": ""}, generator=gen())
    assert rand.ctx.shape == (6, 32) and rand.ctx.std() < 0.05
    assert rand(images(2)).shape == (2, len(CLASSES))


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("tower", ["conv", "vit"])
@pytest.mark.parametrize("make", [promptkd, lambda t: kdpl(t, n_prompts=2, prompt_depth=1)],
                         ids=["promptkd", "kdpl"])
def test_checkpoint_reloads_to_bit_identical_logits(tmp_path, tower, make):
    student = make(tower)
    nudge(student)
    save_student(student, tmp_path / "student.pt")
    loaded = load_student(tmp_path / "student.pt")
    assert type(loaded) is type(student) and not loaded.training
    x = images(3, size=28)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
    blob = torch.load(tmp_path / "student.pt", weights_only=True)
    assert all(not k.startswith(("clip.", "encoder.visual.")) for k in blob["trainable"])
    if isinstance(student, PromptKDStudent):
        # the frozen part stored is the image tower alone: no text tower in a PromptKD checkpoint
        assert not any(k.startswith(("token_embedding", "text_projection", "ln_final")) for k in blob["frozen"])
        assert torch.equal(loaded.class_vectors, student.class_vectors)
    else:
        assert loaded.classnames == CLASSES and torch.equal(loaded.ctx, student.ctx)
        assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
               [n for n, p in student.named_parameters() if p.requires_grad]


def test_bad_prompt_student_checkpoints(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_student(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="unreadable"):
        load_student(tmp_path / "garbage.pt")
    save_student(CnnStudent(class_vectors(), 100.0, head="projection", width=4, depth=1, backbone="cifar_resnet"), tmp_path / "cnn.pt")
    with pytest.raises(PipelineError, match="holds a 'cnn' student, not promptkd"):
        load_student(tmp_path / "cnn.pt", kind="promptkd")
    save_student(promptkd("conv"), tmp_path / "s.pt")
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    blob["trainable"]["projector.0.weight"] = torch.zeros(3, 3)
    torch.save(blob, tmp_path / "s.pt")
    with pytest.raises(PipelineError, match="does not match"):
        load_student(tmp_path / "s.pt")


# ---------------------------------------------------------------- class-name dictionary

def test_shipped_class_name_dictionary():
    names = load_classnames()
    assert len(names) >= 2000 and len(set(names)) == len(names)
    assert all(n == n.lower() and n == n.strip() for n in names)
    assert {"circle", "triangle", "square", "star", "heart", "cross", "crescent"} <= set(names)


def test_class_name_dictionary_errors(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_classnames(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(PipelineError, match="empty"):
        load_classnames(tmp_path / "empty.txt")
    (tmp_path / "dup.txt").write_text("cat\ndog  # a pet\ncat\n")
    with pytest.raises(PipelineError, match="cat"):
        load_classnames(tmp_path / "dup.txt")
    (tmp_path / "ok.txt").write_text("cat\ndog  # a pet\n")
    assert load_classnames(tmp_path / "ok.txt") == ["cat", "dog"]
