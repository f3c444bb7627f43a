"""Behavioural tests for the procedural PACS-like world (clipdistill.world)."""

from __future__ import annotations

import csv
import itertools
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdistill.world import (CLASSES, EVAL_DOMAINS, PLAIN_SHARE, STYLES, TRAIN_ONLY_STYLES, VOCABULARY, caption, render,
                               render_split)


def _renders(cls: str, style: str, count: int, seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render(cls, style, size, rng) for _ in range(count)])


def _luma(imgs: np.ndarray) -> np.ndarray:
    return imgs.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _chroma(imgs: np.ndarray) -> np.ndarray:
    """max - min over RGB: 0 for greys, large for saturated colours."""
    return imgs.max(axis=-1).astype(np.float32) - imgs.min(axis=-1)


def test_names():
    assert CLASSES == ("circle", "triangle", "square", "star", "heart", "cross", "crescent")
    assert EVAL_DOMAINS == ("photo", "painting", "cartoon", "sketch")
    assert len(TRAIN_ONLY_STYLES) >= 3
    assert STYLES == EVAL_DOMAINS + TRAIN_ONLY_STYLES
    assert not set(EVAL_DOMAINS) & set(TRAIN_ONLY_STYLES)
    # Style names go straight into captions such as "a neon drawing of a star".
    assert all(re.fullmatch(r"[a-z]+", s) for s in STYLES)


@pytest.mark.parametrize("size", [32, 64])
def test_every_class_and_style_renders(size):
    rng = np.random.default_rng(size)
    for cls, style in itertools.product(CLASSES, STYLES):
        img = render(cls, style, size, rng)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8, (cls, style)
        assert img.std() > 5, f"{cls}/{style} at {size} px is nearly blank"


def test_large_size_renders():
    rng = np.random.default_rng(0)
    for style in STYLES:
        img = render("heart", style, 224, rng)
        assert img.shape == (224, 224, 3) and img.dtype == np.uint8


def test_same_seed_same_image_other_seed_differs():
    for style in STYLES:
        a = _renders("star", style, 3, seed=1)
        assert np.array_equal(a, _renders("star", style, 3, seed=1)), style
        assert not np.array_equal(a, _renders("star", style, 3, seed=2)), style
        assert not np.array_equal(a[0], a[1]), f"{style}: consecutive draws repeat"


def test_sketch_is_dark_grey_lines_on_light_paper():
    imgs = _renders("square", "sketch", 20)
    luma, chroma = _luma(imgs), _chroma(imgs)
    assert luma.mean() > 180
    assert chroma.mean() < 25
    dark = (luma < 150).mean(axis=(1, 2))
    assert (dark > 0.01).all(), "every sketch needs visible pencil lines"
    assert (dark < 0.35).all(), "a sketch is outline only, not a filled shape"


def test_cartoon_has_plain_background_and_dark_outline():
    for img in _renders("heart", "cartoon", 20):
        corners = {tuple(img[y, x]) for y in (0, -1) for x in (0, -1)}
        assert len(corners) == 1, f"cartoon corners differ: {corners}"
        assert _luma(img).min() < 60, "no dark outline"


def test_photo_background_is_textured():
    spread, grain = [], []
    for img in _renders("circle", "photo", 30):
        luma = _luma(img)
        rows, cols = luma[[0, -1], :], luma[:, [0, -1]].T  # the outermost ring: background only
        spread.append(np.concatenate([rows.ravel(), cols.ravel()]).std())
        grain.append(np.concatenate([np.diff(rows, axis=1).ravel(), np.diff(cols, axis=1).ravel()]).std())
    assert min(spread) > 2.0, "some photo background is flat"
    assert np.median(grain) > 5.0, "photo backgrounds lack fine texture / noise"


def test_train_only_styles_look_like_their_names():
    neon = _luma(_renders("cross", "neon", 20))
    assert np.median(neon) < 60 and (neon.max(axis=(1, 2)) > 150).all()
    sil = _renders("cross", "silhouette", 20)
    assert (_luma(sil).min(axis=(1, 2)) < 40).all()
    assert np.median(_luma(sil)) > 80


def test_styles_differ_in_simple_statistics():
    stats = {}
    for style in STYLES:
        imgs = _renders("star", style, 20)
        luma = _luma(imgs)
        stats[style] = np.array([luma.mean(), luma.std(), _chroma(imgs).mean()])
    for a, b in itertools.combinations(STYLES, 2):
        assert np.abs(stats[a] - stats[b]).max() > 3, (a, b, stats[a], stats[b])


def _silhouette_mask(cls: str, seed: int) -> np.ndarray:
    img = render(cls, "silhouette", 64, np.random.default_rng(seed))
    return _luma(img) < 60


def test_classes_differ_for_the_same_pose():
    # The pose is drawn first, so one seed places every class identically; their masks must differ.
    for seed in range(3):
        masks = {c: _silhouette_mask(c, seed) for c in CLASSES}
        for a, b in itertools.combinations(CLASSES, 2):
            smaller = min(masks[a].sum(), masks[b].sum())
            assert (masks[a] ^ masks[b]).sum() > 0.08 * smaller, (seed, a, b)


def test_crescent_is_a_disc_with_a_bite():
    for seed in range(3):
        disc, moon = _silhouette_mask("circle", seed), _silhouette_mask("crescent", seed)
        assert (moon & ~disc).sum() <= 0.02 * moon.sum()
        assert 0.2 * disc.sum() < moon.sum() < 0.8 * disc.sum()


def test_mean_cartoon_images_differ_between_classes():
    # Same seed per class: identical poses and colours, so only the shapes can make the means differ.
    means = {c: _renders(c, "cartoon", 50, seed=100).astype(np.float32).mean(axis=0) for c in CLASSES}
    for a, b in itertools.combinations(CLASSES, 2):
        assert np.abs(means[a] - means[b]).mean() > 1.0, (a, b)


def _word(word: str, text: str) -> bool:
    """`word` as a whole word or phrase of `text` ("realism" is not in "surrealism")."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _names(text: str, look: str) -> bool:
    """Whether `text` names `look`: its name (as a word prefix: "photo" in "photograph") or a vocabulary word."""
    return re.search(rf"(?<![\w-]){look}", text) is not None or any(_word(w, text) for w in VOCABULARY[look])


def test_captions_name_class_and_style():
    """Every caption names its class; a styled one names only its own look, by name or by a word
    of its vocabulary; about PLAIN_SHARE name no style, as web captions do."""
    rng = np.random.default_rng(0)
    for cls, style in itertools.product(CLASSES, STYLES):
        texts = [caption(cls, style, rng) for _ in range(400)]
        assert len(set(texts)) >= 20, f"too few phrasings for {style}"
        plain = 0
        for t in texts:
            assert cls in t, t
            own = _names(t, style)
            others = [s for s in STYLES if s != style and _names(t, s)]
            assert not others, f"{t!r} also names {others}"
            plain += not own
        assert abs(plain / len(texts) - PLAIN_SHARE) < 0.06, (style, plain)
        used = {w for w in VOCABULARY[style] if any(_word(w, t) for t in texts)}
        assert len(used) >= len(VOCABULARY[style]) // 2, (style, used)
    a = [caption("star", "sketch", np.random.default_rng(5)) for _ in range(3)]
    assert a == [caption("star", "sketch", np.random.default_rng(5)) for _ in range(3)]


def test_vocabulary_covers_the_mix_prompt_dictionary():
    """Every style of Mix-Prompt's dictionary is a caption word of exactly one rendered look, and no
    word contains another look's name: the teacher learns each dictionary token from images."""
    from clipdistill.prompts import load_styles
    words = [w for ws in VOCABULARY.values() for w in ws]
    assert len(words) == len(set(words))
    assert set(load_styles("")) <= set(words)
    for look, ws in VOCABULARY.items():
        for w in ws:
            assert not [s for s in STYLES if s != look and _names(w, s)], (look, w)


def test_unknown_names_raise_value_error(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="'hexagon'"):
        render("hexagon", "photo", 32, rng)
    with pytest.raises(ValueError, match="'origami'"):
        render("star", "origami", 32, rng)
    with pytest.raises(ValueError, match="'hexagon'"):
        caption("hexagon", "photo", rng)
    with pytest.raises(ValueError, match="'origami'"):
        caption("star", "origami", rng)
    with pytest.raises(ValueError, match="'hexagon'"):
        render_split(tmp_path, "train", ["star", "hexagon"], ["photo"], 2, 32, 0, True)
    with pytest.raises(ValueError, match="'origami'"):
        render_split(tmp_path, "train", ["star"], ["origami"], 2, 32, 0, True)
    assert not (tmp_path / "train").exists(), "nothing may be written before validation"


def test_render_split_layout_and_captions(tmp_path):
    classes, styles = ["star", "heart", "crescent"], ["sketch", "neon"]
    n = render_split(tmp_path, "train", classes, styles, 4, 32, 0, with_captions=True)
    assert n == 3 * 2 * 4
    out = tmp_path / "train"
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    expected = sorted(f"{s}/{c}/{i:05d}.png" for s in styles for c in classes for i in range(4))
    assert pngs == expected
    with Image.open(out / "neon/heart/00003.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    with open(out / "captions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "class", "style", "caption"]
    assert sorted(r[0] for r in rows[1:]) == expected
    for path, cls, style, text in rows[1:]:
        assert path.split("/")[:2] == [style, cls]
        assert cls in text and not [s for s in STYLES if s != style and _names(text, s)], text


def test_render_split_without_captions(tmp_path):
    assert render_split(tmp_path, "test", ["circle"], ["photo"], 3, 32, 0, with_captions=False) == 3
    assert not (tmp_path / "test" / "captions.csv").exists()


def _split_bytes(root: Path, **kw) -> dict[str, bytes]:
    args = dict(split="train", classes=["star", "cross"], styles=["photo", "painting"],
                per_class_style=3, size=32, seed=0, with_captions=True)
    args.update(kw)
    render_split(root, **args)
    base = root / args["split"]
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def test_render_split_is_byte_deterministic(tmp_path):
    a = _split_bytes(tmp_path / "a")
    assert a == _split_bytes(tmp_path / "b")
    c = _split_bytes(tmp_path / "c", seed=1)
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_render_split_streams_are_independent(tmp_path):
    base = _split_bytes(tmp_path / "base")
    pngs = {k: v for k, v in base.items() if k.endswith(".png")}
    # Another split with the same seed renders different images.
    test = _split_bytes(tmp_path / "test", split="test")
    assert all(test[k] != v for k, v in pngs.items())
    # Adding a class or style, or dropping captions, leaves existing cells untouched.
    more = _split_bytes(tmp_path / "more", classes=["circle", "star", "cross"], styles=["sketch", "photo", "painting"])
    assert all(more[k] == v for k, v in pngs.items())
    bare = _split_bytes(tmp_path / "bare", with_captions=False)
    assert {k: v for k, v in bare.items() if k.endswith(".png")} == pngs
    # More images per cell extend the split rather than reshuffle it.
    longer = _split_bytes(tmp_path / "longer", per_class_style=5)
    assert all(longer[k] == v for k, v in pngs.items())


def test_rendering_is_fast_enough():
    # The pipeline renders thousands of 32 px images; guard against gross (10x) regressions only.
    rng = np.random.default_rng(0)
    start = time.process_time()
    for cls, style in itertools.product(CLASSES, STYLES):
        for _ in range(3):
            render(cls, style, 32, rng)
    per_image = (time.process_time() - start) / (len(CLASSES) * len(STYLES) * 3)
    assert per_image < 0.03, f"{per_image * 1e3:.1f} ms per 32 px image"


def test_size_and_rng_are_validated():
    with pytest.raises(ValueError):
        render("star", "photo", 4, np.random.default_rng(0))
    with pytest.raises(TypeError):
        render("star", "photo", 32, 0)
