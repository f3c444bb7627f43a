"""CLIP models (the teacher, and the smaller CLIP the prompt students start from): the small
embedded one trained here (clip_training.py), or an open_clip architecture + weights.

Both are plain `open_clip.CLIP` modules behind one `ClipModel` wrapper, so synthesis, text
features, distillation and evaluation run the same code on the embedded world and on ViT-L/14.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .preprocess import Preprocess, clip_default, open_clip_preprocess
from .runtime import PipelineError, read_checkpoint

MAX_LOGIT_SCALE = 100.0  # CLIP's cap on exp(logit_scale), as open_clip clamps it
CLIP_SOURCES = ("embedded", "open_clip")  # `teacher.source`, `student_clip.source`: trained here | loaded


class ConvImageTower(nn.Module):
    """A small VGG-style image tower for the embedded teacher: 4 conv stages (3x3 conv, BN, 2x2 max
    pool, ReLU) at width w, 2w, 4w, 4w, global average pool, linear to the embedding.

    A ViT trained from scratch on a few thousand 32 px images learns shape far too slowly for a
    CPU budget of minutes; a conv tower learns it in a few epochs. open_clip's CLIP calls
    `self.visual(images)`, so this slots in for its ViT with nothing else changed.
    [B, 3, S, S] (normalised) -> [B, embed_dim].
    """

    def __init__(self, embed_dim: int, width: int, image_size: int):
        super().__init__()
        self.image_size = image_size
        chans = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            # Pool before ReLU: the same function and gradients, bit for bit (ReLU is monotone, so it
            # commutes with max, and ties resolve alike), with the ReLU and its backward on a quarter
            # of the elements: never slower, though within the noise of a synthesis step
            # (benchmarks/synthesis_ops.py). Neither layer has parameters: state-dict keys are as before.
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.MaxPool2d(2),
                       nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], embed_dim)

    def forward(self, x):
        return self.proj(self.features(x).mean(dim=(2, 3)))


# `teacher.vision`, `student_clip.vision`: the embedded image towers (vit: open_clip's own VisionTransformer)
IMAGE_TOWERS = ("convnet", "vit")


def fold_batchnorm(teacher: "ClipModel") -> "ClipModel":
    """Fold every BatchNorm of a frozen conv image tower into the convolution before it.

    The same function (up to float rounding) with a third fewer ops per layer: synthesis
    backpropagates through the frozen teacher at every step of every image. BN layers become
    Identity so layer indices stay put. ViT towers (LayerNorm) are returned unchanged. In place.
    """
    visual = teacher.model.visual
    if isinstance(visual, ConvImageTower):
        layers = list(visual.features)
        for i, (a, b) in enumerate(zip(layers[:-1], layers[1:])):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                if a.training or b.training:
                    raise ValueError("fold_batchnorm needs a teacher in eval mode")
                layers[i], layers[i + 1] = fuse_conv_bn_eval(a, b).requires_grad_(False), nn.Identity()
        visual.features = nn.Sequential(*layers)
    return teacher


def build_clip(config: dict) -> open_clip.CLIP:
    """open_clip.CLIP from a config; `conv_width` in vision_cfg swaps in the ConvImageTower."""
    config = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    conv_width = config["vision_cfg"].pop("conv_width", None)
    model = open_clip.CLIP(**config)
    if conv_width:
        model.visual = ConvImageTower(config["embed_dim"], conv_width, config["vision_cfg"]["image_size"])
    return model


def embedded_clip_config(*, image_size: int, vision: str, embed_dim: int, vision_width: int, vision_layers: int,
                         vision_heads: int, patch_size: int, text_width: int, text_layers: int, text_heads: int,
                         context_length: int) -> dict:
    """open_clip.CLIP kwargs for a small embedded CLIP (`teacher.*` / `student_clip.*` keys).

    vision convnet: the ConvImageTower at `vision_width` (vision_layers, vision_heads and
    patch_size unused); vit: open_clip's VisionTransformer."""
    vision_cfg = {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                  "head_width": vision_width // vision_heads, "patch_size": patch_size}
    if vision == "convnet":
        vision_cfg = {"image_size": image_size, "layers": 1, "width": 64, "patch_size": image_size,
                      "conv_width": vision_width}
    return {
        "embed_dim": embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": 49408,
            "width": text_width,
            "heads": text_heads,
            "layers": text_layers,
        },
    }


def clip_preprocess(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised [B, 3, size, size]: every CLIP model's and prompt
    student's input convention."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (images - mean) / std


def model_preprocess(model: open_clip.CLIP, image_size: int) -> Preprocess:
    """An open_clip model's own preprocess config (what create_model_and_transforms would use), or
    OpenAI's for the embedded towers, which carry none."""
    if getattr(model.visual, "preprocess_cfg", None):
        return open_clip_preprocess(model)
    return clip_default(image_size)


def clip_logit_scale(model: open_clip.CLIP) -> float:
    """exp(model.logit_scale), capped at 100 as CLIP does: 100 for pretrained CLIPs (PromptKD, KDPL),
    learned for the embedded ones."""
    return float(model.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE))


class ClipModel(nn.Module):
    """A frozen-or-trainable open_clip CLIP with the project's input convention.

    `encode_image` takes images in [0, 1] ([B, 3, H, W], any H, W: resized to `image_size`) and
    normalises them itself with the model's own mean and std (`prep`: open_clip's preprocess
    config for its models, OpenAI's constants for the embedded ones); `encode_text` takes
    strings. Features are L2-normalised. Image files are decoded with `prep`'s geometry
    (`data.file_decoder`), so an image reaches the model as open_clip's own transform gives it.
    """

    def __init__(self, model: open_clip.CLIP, image_size: int, context_length: int, spec: dict):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.context_length = context_length
        self.spec = spec  # how to rebuild it: {"kind": "embedded", "config": ...} or open_clip name+pretrained
        self.prep = model_preprocess(model, image_size)
        self.register_buffer("mean", torch.tensor(self.prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.prep.std).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]

    @property
    def logit_scale(self) -> float:
        return clip_logit_scale(self.model)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts).to(self.mean.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised [B, 3, S, S] at the model's input size."""
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> unit-norm features [B, D]."""
        return F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> unit-norm features [B, D]."""
        return F.normalize(self.model.encode_text(self.tokenize(texts)), dim=-1)

    def logits(self, images: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits [B, C] = logit_scale * cos(image feature, stored class vector)."""
        return self.logit_scale * self.encode_image(images) @ class_features.t()


class CosineClassifier(nn.Module):
    """An image encoder scored against fixed class vectors: logit_scale * cos(feature, vector).

    What a CLIP-style model is at inference once its class vectors are computed: the teacher's
    image tower against the stored class vectors, or a KDPL student's prompted tower against its
    learned text features. [B, 3, H, W] in [0, 1] -> [B, C] (resized and normalised inside)."""

    def __init__(self, encoder: nn.Module, image_size: int, mean: torch.Tensor, std: torch.Tensor,
                 class_vectors: torch.Tensor, logit_scale: float):
        super().__init__()
        self.encoder = encoder
        self.image_size = image_size
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.register_buffer("class_vectors", class_vectors.detach().float().clone())
        self.logit_scale = float(logit_scale)

    @classmethod
    def zero_shot(cls, clip: ClipModel, class_vectors: torch.Tensor) -> "CosineClassifier":
        """`clip`'s image tower (its text tower left out) against `class_vectors` [C, D]."""
        return cls(clip.model.visual, clip.image_size, clip.mean, clip.std, class_vectors, clip.logit_scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = F.normalize(self.encoder(clip_preprocess(images, self.image_size, self.mean, self.std)), dim=-1)
        return self.logit_scale * feats @ self.class_vectors.t()


def build_embedded_clip(**config) -> ClipModel:
    """A randomly initialised embedded CLIP; `config`: embedded_clip_config's keyword arguments."""
    cfg = embedded_clip_config(**config)
    return ClipModel(build_clip(cfg), config["image_size"], config["context_length"],
                     {"kind": "embedded", "config": cfg})


def embedded_clip_from_params(section, image_size: int) -> ClipModel:
    """The embedded CLIP a `teacher` or `student_clip` params section describes (randomly initialised)."""
    return build_embedded_clip(image_size=image_size, vision=section.vision, embed_dim=section.embed_dim,
                               vision_width=section.vision_width, vision_layers=section.vision_layers,
                               vision_heads=section.vision_heads, patch_size=section.patch_size,
                               text_width=section.text_width, text_layers=section.text_layers,
                               text_heads=section.text_heads, context_length=section.context_length)


RANDOM_WEIGHTS = "random"  # `pretrained: random`: the architecture, randomly initialised (smoke tests, benchmarks)


def load_open_clip(model_name: str, pretrained: str) -> ClipModel:
    """An open_clip architecture with a pretrained tag (downloaded by open_clip, or from its
    cache), a local checkpoint file, or `random` weights; frozen, in eval mode, on the CPU.

    OpenAI weights were trained with QuickGELU; open_clip only switches it on for `-quickgelu`
    names, so the `openai` tag or a local file whose name contains "openai" forces it here.
    """
    if model_name not in open_clip.list_models():
        raise PipelineError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    is_file = Path(pretrained).suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or "/" in pretrained
    if is_file and not Path(pretrained).is_file():
        raise PipelineError(f"CLIP checkpoint not found: {pretrained} (download the {model_name} weights to this "
                            "path, or set pretrained to an open_clip tag)")
    quick = pretrained == "openai" or (is_file and "openai" in Path(pretrained).name.lower())
    weights = None if pretrained in ("", RANDOM_WEIGHTS) else pretrained
    try:
        model = open_clip.create_model(model_name, pretrained=weights, force_quick_gelu=quick)
    except Exception as exc:  # hub errors (offline), unknown tags and unreadable files alike: one line
        hint = ("" if is_file else f"; offline, download the {model_name} '{pretrained}' weights and set "
                "pretrained to the file's path")
        raise PipelineError(f"cannot load open_clip {model_name} with pretrained={pretrained!r}: "
                            f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}{hint}") from None
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    clip = ClipModel(model, int(size), model.context_length,
                     {"kind": "open_clip", "model": model_name, "pretrained": pretrained})
    return clip.eval().requires_grad_(False)


CLIP_FILE = "clip.pt"  # what the teacher and student_clip stages write in their output folder


def decoding(clip: ClipModel, image_size: int) -> Preprocess:
    """How the pipeline decodes image files for `clip`: its preprocessing geometry (resize mode,
    interpolation) at the pipeline's image side `image_size` (world.image_size)."""
    return dataclasses.replace(clip.prep, size=image_size)


def save_clip(clip: ClipModel, path: str | Path) -> None:
    """Embedded CLIPs store weights; open_clip ones store only where their weights live."""
    blob = {"spec": clip.spec, "image_size": clip.image_size, "context_length": clip.context_length}
    if clip.spec["kind"] == "embedded":
        blob["state_dict"] = clip.model.state_dict()
    torch.save(blob, path)


def load_clip(path: str | Path, device: torch.device | str = "cpu") -> ClipModel:
    """Rebuild the CLIP a `teacher` or `student_clip` stage wrote (its folder or its clip.pt);
    frozen, in eval mode, on `device`."""
    path = Path(path)
    if path.is_dir():
        path = path / CLIP_FILE
    blob = read_checkpoint(path, "CLIP checkpoint", "teacher or student_clip", "spec")
    spec = blob["spec"]
    if spec["kind"] == "embedded":
        model = build_clip(spec["config"])
        model.load_state_dict(blob["state_dict"])
        clip = ClipModel(model, blob["image_size"], blob["context_length"], spec)
    else:
        clip = load_open_clip(spec["model"], spec["pretrained"])
    clip.eval().requires_grad_(False)
    return clip.to(device)


