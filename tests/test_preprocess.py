import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms as T

from clipdistill.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    Preprocess,
    clip_default,
    decode,
    normalize_array,
    open_clip_preprocess,
    resize_crop,
)

# (width, height, PIL mode): non-square both ways, grayscale, tiny (upscaled), one at ViT-B-32's
# size (resize skipped), and 32x75, whose shortest-side crop offset is round(150.5) = 150 (half to even)
IMAGES = [(300, 200, "RGB"), (200, 331, "RGB"), (257, 190, "L"), (17, 40, "RGB"), (224, 224, "RGB"),
          (32, 75, "RGB")]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for w, h, mode in IMAGES:
        shape = (h, w) if mode == "L" else (h, w, 3)
        path = folder / f"{w}x{h}_{mode}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def ours(path, prep: Preprocess) -> np.ndarray:
    x = decode(path, prep)
    assert x.dtype == np.uint8 and x.shape == (prep.size, prep.size, 3)
    return normalize_array(x.transpose(2, 0, 1)[None].astype(np.float32) / 255, prep)


def max_diff(transform, path, prep: Preprocess) -> float:
    with Image.open(path) as im:
        theirs = transform(im).numpy()[None]
    return float(np.abs(ours(path, prep) - theirs).max())


@pytest.fixture(scope="module")
def vit_b_32():
    model, _, val = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return model, val


@pytest.fixture(scope="module")
def pe_core_t_meta():
    """PE-Core-T-16-384 with the preprocessing of its `meta` weights. With pretrained=None open_clip
    keeps its OpenAI defaults for every built-in model (a tag's mean/std/resize_mode are merged only
    when its weights load), so the tag's config is passed as the overrides it amounts to."""
    tag = open_clip.get_pretrained_cfg("PE-Core-T-16-384", "meta")
    model, _, val = open_clip.create_model_and_transforms(
        "PE-Core-T-16-384", pretrained=None, image_mean=tag["mean"], image_std=tag["std"],
        image_interpolation=tag["interpolation"], image_resize_mode=tag["resize_mode"])
    return model, val


def test_open_clip_preprocess_reads_the_model_config(vit_b_32, pe_core_t_meta):
    assert open_clip_preprocess(vit_b_32[0]) == clip_default(224)
    assert open_clip_preprocess(pe_core_t_meta[0]) == Preprocess(
        384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "squash", "bilinear", 0)


@pytest.mark.parametrize("model_fixture", ["vit_b_32", "pe_core_t_meta"])
def test_decode_matches_open_clip_preprocess_val(model_fixture, image_files, request):
    model, preprocess_val = request.getfixturevalue(model_fixture)
    prep = open_clip_preprocess(model)
    for path in image_files:
        assert max_diff(preprocess_val, path, prep) <= 1 / 255, path.name


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_resize_crop_matches_open_clip_eval_transform(resize_mode, interpolation, image_files):
    """Every mode open_clip's eval transform has, at a size where the images are both down- and
    upscaled, and with a fill colour that longest's padding must use."""
    prep = Preprocess(48, CLIP_MEAN, CLIP_STD, resize_mode, interpolation, fill_color=200)
    cfg = PreprocessCfg(size=48, mean=CLIP_MEAN, std=CLIP_STD, resize_mode=resize_mode,
                        interpolation=interpolation, fill_color=200)
    transform = image_transform_v2(cfg, is_train=False)
    for path in image_files:
        assert max_diff(transform, path, prep) <= 1 / 255, path.name


def test_longest_pads_with_fill_color(image_files):
    prep = Preprocess(48, CLIP_MEAN, CLIP_STD, "longest", "bicubic", fill_color=200)
    x = decode(image_files[0], prep)  # 300x200 -> 48x32 resized, 8 rows of fill above and below
    assert (x[:8] == 200).all() and (x[-8:] == 200).all() and not (x[8:40] == 200).all()


def test_nearest_matches_torchvision(image_files):
    """open_clip has no nearest mode; torchvision's Resize + CenterCrop is the reference."""
    prep = Preprocess(48, CLIP_MEAN, CLIP_STD, "shortest", "nearest", 0)
    transform = T.Compose([
        T.Resize(48, T.InterpolationMode.NEAREST), T.CenterCrop(48),
        T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    for path in image_files:
        assert max_diff(transform, path, prep) <= 1 / 255, path.name


def test_resize_crop_output_and_normalize_array():
    im = Image.new("L", (10, 30), 255)
    out = resize_crop(im, clip_default(8))
    assert out.mode == "RGB" and out.size == (8, 8)
    x = normalize_array(np.ones((2, 3, 4, 4), np.float32), clip_default(4))
    assert x.dtype == np.float32
    expected = (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[1, :, 2, 3], expected, rtol=1e-6)
    theirs = T.Normalize(CLIP_MEAN, CLIP_STD)(torch.ones(3, 4, 4))
    np.testing.assert_allclose(x[0], theirs.numpy(), rtol=1e-6)


def test_decode_propagates_pil_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        decode(tmp_path / "missing.png", clip_default(8))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(Image.UnidentifiedImageError):
        decode(tmp_path / "bad.png", clip_default(8))


@pytest.mark.parametrize("bad", [dict(resize_mode="crop"), dict(interpolation="lanczos"), dict(size=0),
                                 dict(mean=(0.5, 0.5))])
def test_preprocess_rejects_bad_values(bad):
    fields = {**clip_default(224).to_dict(), **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        Preprocess(**fields)


def test_non_square_model_size_is_rejected():
    """A model without factory-set preprocess_cfg: open_clip falls back to visual.image_size."""
    vision = dict(image_size=(32, 48), layers=1, width=32, head_width=16, patch_size=16)
    text = dict(context_length=8, vocab_size=16, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text)
    with pytest.raises(ValueError, match=r"\(32, 48\)"):
        open_clip_preprocess(model)


def test_to_dict_from_dict_round_trip():
    prep = Preprocess(384, (0.5, 0.25, 0.125), (0.5, 0.5, 1.0), "longest", "bilinear", 7)
    d = json.loads(json.dumps(prep.to_dict()))
    assert d["mean"] == [0.5, 0.25, 0.125]
    back = Preprocess.from_dict(d)
    assert back == prep and isinstance(back.mean, tuple) and isinstance(back.std, tuple)
