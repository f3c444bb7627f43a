"""Image preprocessing faithful to open_clip's eval transform, without torch.

open_clip's `image_transform_v2(cfg, is_train=False)` runs torchvision transforms on PIL images,
and those call PIL for the pixel work. Here we make the same PIL calls with the same
size and offset arithmetic, so the uint8 result matches and data loading needs no torch
(normalisation can then run on whatever device holds the batch).
"""

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (open_clip's OPENAI_DATASET_MEAN)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PIL_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocess:
    """What turns an image file into a model input: a square `size` crop, then (x - mean) / std.

    resize_mode, interpolation and fill_color mean what they mean in open_clip's PreprocessCfg."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str
    interpolation: str
    fill_color: int

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (mean/std as lists)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


def clip_default(size: int) -> Preprocess:
    """OpenAI CLIP's preprocessing (open_clip's defaults) at `size`."""
    return Preprocess(size, CLIP_MEAN, CLIP_STD, "shortest", "bicubic", 0)


def _triple(v) -> tuple[float, float, float]:
    """open_clip repeats a scalar mean/std over the 3 channels."""
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3


def _square_size(size) -> int:
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"only square image sizes are supported, the model wants {tuple(size)}")
    return int(size[0])


def open_clip_preprocess(model) -> Preprocess:
    """The preprocessing open_clip's `create_model_and_transforms` builds for `model`.

    Its merged config (defaults < pretrained tag < forced overrides, image_size from the tower)
    lives on `model.visual.preprocess_cfg`; missing keys take PreprocessCfg's defaults, as there.
    open_clip's eval transform treats interpolation "random" as bicubic."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), open_clip.get_model_preprocess_cfg(model)))
    return Preprocess(
        size=_square_size(cfg.size),
        mean=_triple(cfg.mean),
        std=_triple(cfg.std),
        resize_mode=cfg.resize_mode,
        interpolation="bicubic" if cfg.interpolation == "random" else cfg.interpolation,
        fill_color=int(cfg.fill_color),
    )


def _resize(im: Image.Image, w: int, h: int, prep: Preprocess) -> Image.Image:
    """PIL resize, skipped at the target size (as torchvision's F.resize does)."""
    return im if im.size == (w, h) else im.resize((w, h), _PIL_FILTERS[prep.interpolation])


def _shortest_size(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int): shorter side -> size, longer side truncated (int(), not round)."""
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def _longest_size(w: int, h: int, size: int) -> tuple[int, int]:
    """open_clip ResizeKeepRatio(longest=1): longer side -> size, sides rounded with round()."""
    ratio = max(h / size, w / size)
    return round(w / ratio), round(h / ratio)


def _center_crop_or_pad(im: Image.Image, size: int, fill: int) -> Image.Image:
    """torchvision CenterCrop / open_clip CenterCropOrPad: pad short sides with `fill` (extra pixel
    right/bottom), then crop at offsets int(round(d / 2)) -- Python's round, half to even."""
    w, h = im.size
    if w < size or h < size:
        pw, ph = max(size - w, 0), max(size - h, 0)
        padded = Image.new("RGB", (w + pw, h + ph), (fill,) * 3)
        padded.paste(im, (pw // 2, ph // 2))
        im, (w, h) = padded, padded.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return im if (w, h) == (size, size) else im.crop((left, top, left + size, top + size))


def resize_crop(im: Image.Image, prep: Preprocess) -> Image.Image:
    """RGB image of prep.size x prep.size with the geometry of open_clip's eval transform.

    shortest: Resize(size) + CenterCrop (never pads); longest: ResizeKeepRatio + CenterCropOrPad
    with fill_color; squash: Resize((size, size)). We convert to RGB first (open_clip converts
    after the resize): identical for RGB and grayscale, but palette images get real interpolation
    here (PIL resizes "P" nearest-neighbour) and RGBA is resized without alpha premultiplication."""
    im = im.convert("RGB")
    w, h, s = *im.size, prep.size
    if prep.resize_mode == "squash":
        return _resize(im, s, s, prep)
    if prep.resize_mode == "longest":
        return _center_crop_or_pad(_resize(im, *_longest_size(w, h, s), prep), s, prep.fill_color)
    return _center_crop_or_pad(_resize(im, *_shortest_size(w, h, s), prep), s, 0)


def decode(path, prep: Preprocess) -> np.ndarray:
    """uint8 [size, size, 3] from an image file; PIL's errors (missing, unreadable) propagate."""
    with Image.open(path) as im:
        return np.array(resize_crop(im, prep), dtype=np.uint8)


def normalize_array(x: np.ndarray, prep: Preprocess) -> np.ndarray:
    """float32 [N, 3, H, W] in [0, 1] -> (x - mean) / std per channel, as torchvision Normalize."""
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(3, 1, 1)
    return ((x - mean) / std).astype(np.float32, copy=False)
