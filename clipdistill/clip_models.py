"""CLIP teachers: the small embedded one trained here, or an open_clip architecture + weights.

Both are plain `open_clip.CLIP` modules behind one `ClipTeacher` wrapper, so synthesis, text
features, distillation and evaluation run the same code on the embedded world and on ViT-L/14.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .augment import flip_translate
from .resumable import Checkpoints, EpochOrder, run_steps
from .runtime import PipelineError, read_checkpoint

# OpenAI CLIP's preprocessing constants; the embedded teacher uses them too, so every teacher
# takes the same [0, 1] input convention.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConvImageTower(nn.Module):
    """A small VGG-style image tower for the embedded teacher: 4 conv stages (3x3 conv, BN, ReLU,
    2x2 pool) at width w, 2w, 4w, 4w, global average pool, linear to the embedding.

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
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(chans[-1], embed_dim)

    def forward(self, x):
        return self.proj(self.features(x).mean(dim=(2, 3)))


def fold_batchnorm(teacher: "ClipTeacher") -> "ClipTeacher":
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


def embedded_clip_config(p, image_size: int) -> dict:
    """open_clip.CLIP kwargs for the small embedded teacher, from `teacher.*` params."""
    vision_cfg = {"image_size": image_size, "layers": p.vision_layers, "width": p.vision_width,
                  "head_width": p.vision_width // p.vision_heads, "patch_size": p.patch_size}
    if p.vision == "convnet":
        vision_cfg = {"image_size": image_size, "layers": 1, "width": 64, "patch_size": image_size,
                      "conv_width": p.vision_width}
    return {
        "embed_dim": p.embed_dim,
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": p.context_length,
            "vocab_size": 49408,
            "width": p.text_width,
            "heads": p.text_heads,
            "layers": p.text_layers,
        },
    }


class ClipTeacher(nn.Module):
    """A frozen-or-trainable open_clip CLIP with the project's input convention.

    `encode_image` takes images in [0, 1] ([B, 3, H, W], any H, W: resized to `image_size`) and
    normalises them itself; `encode_text` takes strings. Features are L2-normalised.
    """

    def __init__(self, model: open_clip.CLIP, image_size: int, context_length: int, spec: dict):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.context_length = context_length
        self.spec = spec  # how to rebuild it: {"kind": "embedded", "config": ...} or open_clip name+pretrained
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)

    @property
    def embed_dim(self) -> int:
        return self.model.text_projection.shape[1]

    @property
    def logit_scale(self) -> float:
        """The model's own scale: 100 for pretrained CLIP (PromptKD, KDPL), learned for the embedded one."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100))

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(texts).to(self.mean.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> normalised [B, 3, S, S] at the teacher's input size."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> unit-norm features [B, D]."""
        return F.normalize(self.model.encode_image(self.preprocess(images)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list of B strings -> unit-norm features [B, D]."""
        return F.normalize(self.model.encode_text(self.tokenize(texts)), dim=-1)

    def logits(self, images: torch.Tensor, class_features: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits [B, C] = logit_scale * cos(image feature, stored class vector)."""
        return self.logit_scale * self.encode_image(images) @ class_features.t()


def build_embedded_teacher(p, image_size: int) -> ClipTeacher:
    cfg = embedded_clip_config(p, image_size)
    model = build_clip(cfg)
    return ClipTeacher(model, image_size, p.context_length, {"kind": "embedded", "config": cfg})


RANDOM_WEIGHTS = "random"  # `pretrained: random`: the architecture, randomly initialised (smoke tests, benchmarks)


def load_open_clip_teacher(model_name: str, pretrained: str) -> ClipTeacher:
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
    teacher = ClipTeacher(model, int(size), model.context_length,
                          {"kind": "open_clip", "model": model_name, "pretrained": pretrained})
    return teacher.eval().requires_grad_(False)


def save_teacher(teacher: ClipTeacher, path: str | Path) -> None:
    """Embedded teachers store weights; open_clip teachers store only where their weights live."""
    blob = {"spec": teacher.spec, "image_size": teacher.image_size, "context_length": teacher.context_length}
    if teacher.spec["kind"] == "embedded":
        blob["state_dict"] = teacher.model.state_dict()
    torch.save(blob, path)


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> ClipTeacher:
    """Rebuild the teacher a `teacher` stage wrote; frozen, in eval mode, on `device`."""
    path = Path(path)
    if path.is_dir():
        path = path / "teacher.pt"
    blob = read_checkpoint(path, "teacher checkpoint", "teacher", "spec")
    spec = blob["spec"]
    if spec["kind"] == "embedded":
        model = build_clip(spec["config"])
        model.load_state_dict(blob["state_dict"])
        teacher = ClipTeacher(model, blob["image_size"], blob["context_length"], spec)
    else:
        teacher = load_open_clip_teacher(spec["model"], spec["pretrained"])
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, token_ids: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE where every pair with an identical caption is a positive.

    With 7 classes and a handful of styles, a batch holds many identical captions; treating them
    as negatives (plain CLIP) would push apart features that should match. Targets are the
    uniform distribution over identical-caption partners.
    img, txt: unit-norm [B, D]; token_ids: [B, L].
    """
    logits = logit_scale * img @ txt.t()
    same = (token_ids[:, None, :] == token_ids[None, :, :]).all(-1).float()
    targets = same / same.sum(1, keepdim=True)
    loss_i = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t = torch.sum(-targets * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    return 0.5 * (loss_i + loss_t)


def train_teacher(teacher: ClipTeacher, images: torch.Tensor, captions: list[str], *, epochs: int,
                  batch_size: int, lr: float, weight_decay: float, generator: torch.Generator,
                  device: torch.device, checkpoints: Checkpoints | None = None) -> list[float]:
    """Image-caption contrastive training of the embedded teacher.

    images: uint8 [N, 3, H, W]; captions: N strings. AdamW + cosine schedule with warm-up;
    light augmentation (flip, 4-px translation). `checkpoints` makes it resumable
    (`resumable.run_steps`). Returns per-step losses.
    """
    teacher.train().to(device)
    tokens = teacher._tokenizer(captions)
    params_decay = [p for n, p in teacher.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    params_other = [p for n, p in teacher.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": params_decay, "weight_decay": weight_decay},
                             {"params": params_other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    batches = EpochOrder(images.shape[0], batch_size, generator)
    total = epochs * batches.steps_per_epoch
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / total * 3.14159265)).item()))

    def step(i: int) -> float:
        idx = batches.batch(i)
        x = flip_translate(images[idx].float().div(255), generator).to(device)
        tok = tokens[idx].to(device)
        img_f = F.normalize(teacher.model.encode_image(teacher.preprocess(x)), dim=-1)
        # Encode each distinct caption once: batches repeat captions, and the text tower dominates cost.
        uniq, inverse = torch.unique(tok, dim=0, return_inverse=True)
        txt_f = F.normalize(teacher.model.encode_text(uniq), dim=-1)[inverse]
        loss = multi_positive_clip_loss(img_f, txt_f, tok, teacher.model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            teacher.model.logit_scale.clamp_(0, 4.6052)  # ln(100), as open_clip does
        return loss.item()

    losses = run_steps(step, total, state={"model": teacher.model, "optimizer": opt, "scheduler": sched,
                                           "batches": batches},
                       generators=[generator], checkpoints=checkpoints, desc="teacher")
    teacher.eval()
    return losses


def materialise_clip(p, world_train: Path, image_size: int, generator: torch.Generator,
                     device: torch.device, checkpoints: Checkpoints | None = None) -> tuple[ClipTeacher, dict]:
    """The CLIP a `teacher`-shaped params section names: trained here on the world's captioned
    train split (source embedded) or loaded from open_clip (source open_clip). Returns
    (model on CPU, summary). Used for the teacher and for the prompt students' smaller CLIP.
    `checkpoints` makes the training resumable."""
    from .data import load_captioned_split

    summary = {"source": p.source}
    if p.source == "embedded":
        images, captions, _ = load_captioned_split(world_train, image_size)
        model = build_embedded_teacher(p, image_size)
        losses = train_teacher(model, images, captions, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                               weight_decay=p.weight_decay, generator=generator, device=device,
                               checkpoints=checkpoints)
        summary.update(final_loss=sum(losses[-20:]) / len(losses[-20:]), steps=len(losses),
                       logit_scale=model.logit_scale)
    else:
        model = load_open_clip_teacher(p.open_clip_model, p.pretrained)
        summary.update(model=p.open_clip_model, pretrained=p.pretrained)
    return model.cpu(), summary
