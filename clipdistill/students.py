"""Students, chosen by `distill.student` from the STUDENTS registry: a small ResNet whose head
either projects into the teacher's embedding space (logits against the stored class vectors, as
in PromptKD) or is a plain linear classifier (`cnn`), and the prompt students (`promptkd`,
`kdpl`, prompt_students.py).

Every student class has the same small interface, so nothing else branches on its type:
`kind`; `from_params(section, *, class_vectors, logit_scale, classes, clip, generator)`, which
unpacks its own params section (`distill.<kind>`); `set_classes(classes, class_vectors)`;
`checkpoint()` and `from_checkpoint(blob, path)`, which `save_student` / `load_student` call.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .losses import Outputs
from .prompt_students import KDPLStudent, PromptKDStudent
from .runtime import PipelineError, read_checkpoint


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, 3 stages of `depth` blocks at width w, 2w, 4w, global pool.

    [B, 3, H, W] -> [B, 4w]. depth=2 is ResNet-14-like; the real-path preset uses torchvision-style
    ResNet-18 through the same interface.
    """

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, width * mult, stride))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


class ResNet18Backbone(nn.Module):
    """torchvision's ResNet-18 (ImageNet layout: 7x7 stem, 4 stages, 11.2M parameters) without its
    classifier, randomly initialised: the paper setting's student at 224 px. [B, 3, H, W] -> [B, 512]."""

    def __init__(self):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = 512

    def forward(self, x):
        return self.net(x)


# `distill.cnn.backbone`: name -> builder(width, depth) (ResNet-18 has its own fixed layout)
BACKBONES = {"cifar_resnet": ResNetBackbone, "resnet18": lambda width, depth: ResNet18Backbone()}
HEADS = ("projection", "linear")  # `distill.cnn.head`


class CnnStudent(nn.Module):
    """ResNet student with a projection head (PromptKD's shared class vectors) or a linear head.

    Takes images in [0, 1] ([B, 3, H, W]) and normalises them itself; `forward` returns logits
    [B, C]. With the projection head, logits = logit_scale * cos(proj(f), class_vectors), so the
    student classifies with the teacher's stored text features and any class list can be swapped in.
    """

    kind = "cnn"

    def __init__(self, class_vectors: torch.Tensor, logit_scale: float, *, head: str, width: int, depth: int,
                 backbone: str, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.backbone_name, self.width, self.depth = backbone, width, depth
        self.backbone = BACKBONES[backbone](width, depth)
        n_cls, embed_dim = class_vectors.shape
        self.head_kind = head
        if head == "projection":
            # Two-layer projector with BN + ReLU, as in PromptKD's feature projector.
            self.head = nn.Sequential(nn.Linear(self.backbone.out_dim, self.backbone.out_dim),
                                      nn.BatchNorm1d(self.backbone.out_dim), nn.ReLU(),
                                      nn.Linear(self.backbone.out_dim, embed_dim))
        else:  # linear
            self.head = nn.Linear(self.backbone.out_dim, n_cls)
        self.register_buffer("class_vectors", F.normalize(class_vectors.float(), dim=-1))
        self.logit_scale = logit_scale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor, features: bool = False) -> "torch.Tensor | Outputs":
        """Logits [B, C]; with `features`, `Outputs(logits, projection [B, D])` for the feature
        losses (projection head only)."""
        out = self.head(self.backbone((images - self.mean) / self.std))
        if self.head_kind != "projection":
            if features:
                raise ValueError("a linear-head student has no image features to distill")
            return out
        logits = self.logit_scale * F.normalize(out, dim=-1) @ self.class_vectors.t()
        return Outputs(logits, out) if features else logits


    @classmethod
    def from_params(cls, section, *, class_vectors, logit_scale, classes, clip, generator):
        """From `distill.cnn` (backbone, head, width, depth); trained from scratch, no CLIP."""
        return cls(class_vectors, logit_scale, head=section.head, width=section.width, depth=section.depth,
                   backbone=section.backbone)

    def classifier(self) -> nn.Module:
        """The student as a standalone classifier for export: itself (everything is weights)."""
        return self

    def set_classes(self, classes: list[str], class_vectors: torch.Tensor) -> None:
        """Score `classes` by their teacher class vectors [C', D] (projection head only)."""
        self.class_vectors = F.normalize(class_vectors.float(), dim=-1).to(self.class_vectors.device)

    def checkpoint(self) -> dict:
        return {"config": {"head": self.head_kind, "backbone": self.backbone_name, "width": self.width,
                           "depth": self.depth, "logit_scale": self.logit_scale,
                           "class_vectors": self.class_vectors},
                "state_dict": self.state_dict()}

    @classmethod
    def from_checkpoint(cls, blob: dict, path: Path) -> "CnnStudent":
        try:
            model = cls(**blob["config"])
            model.load_state_dict(blob["state_dict"])
        except Exception as exc:  # any mismatched file is one error to the user
            raise PipelineError(f"student checkpoint {path} is unreadable or incompatible: "
                                f"{type(exc).__name__}") from None
        return model


# `distill.student`: name -> student class (its params section is `distill.<name>`)
STUDENTS = {cls.kind: cls for cls in (CnnStudent, PromptKDStudent, KDPLStudent)}


def save_student(student: nn.Module, path) -> None:
    """Write any registered student: its `kind` and what its `checkpoint()` returns."""
    torch.save({"kind": student.kind, **student.checkpoint()}, path)


def load_student(path, device="cpu", kind: str | None = None) -> nn.Module:
    """Any student `save_student` wrote (its `kind` picks the class), in eval mode on `device`;
    `kind` insists on one."""
    path = Path(path)
    blob = read_checkpoint(path, "student checkpoint", "distill", "kind")
    if blob["kind"] not in STUDENTS or (kind is not None and blob["kind"] != kind):
        want = kind or " | ".join(STUDENTS)
        raise PipelineError(f"student checkpoint {path} holds a '{blob['kind']}' student, not {want}")
    return STUDENTS[blob["kind"]].from_checkpoint(blob, path).to(device).eval()
