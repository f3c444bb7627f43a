"""Student models, chosen by `distill.student`: a small ResNet whose head either projects into the
teacher's embedding space (logits against the stored class vectors, as in PromptKD) or is a plain
linear classifier.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def __init__(self, width: int = 32, depth: int = 2):
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


BACKBONES = {"cifar_resnet": ResNetBackbone, "resnet18": ResNet18Backbone}


def build_backbone(name: str, width: int, depth: int) -> nn.Module:
    if name == "cifar_resnet":
        return ResNetBackbone(width, depth)
    if name == "resnet18":
        return ResNet18Backbone()
    raise ValueError(f"unknown distill.backbone '{name}'; choose one of {', '.join(BACKBONES)}")


class CnnStudent(nn.Module):
    """ResNet student with a projection head (PromptKD's shared class vectors) or a linear head.

    Takes images in [0, 1] ([B, 3, H, W]) and normalises them itself; `forward` returns logits
    [B, C]. With the projection head, logits = logit_scale * cos(proj(f), class_vectors), so the
    student classifies with the teacher's stored text features and any class list can be swapped in.
    """

    def __init__(self, class_vectors: torch.Tensor, logit_scale: float, head: str = "projection",
                 width: int = 32, depth: int = 2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 backbone: str = "cifar_resnet"):
        super().__init__()
        self.backbone_name, self.width, self.depth = backbone, width, depth
        self.backbone = build_backbone(backbone, width, depth)
        n_cls, embed_dim = class_vectors.shape
        self.head_kind = head
        if head == "projection":
            # Two-layer projector with BN + ReLU, as in PromptKD's feature projector.
            self.head = nn.Sequential(nn.Linear(self.backbone.out_dim, self.backbone.out_dim),
                                      nn.BatchNorm1d(self.backbone.out_dim), nn.ReLU(),
                                      nn.Linear(self.backbone.out_dim, embed_dim))
        elif head == "linear":
            self.head = nn.Linear(self.backbone.out_dim, n_cls)
        else:
            raise ValueError(f"unknown distill.head '{head}'; choose projection or linear")
        self.register_buffer("class_vectors", F.normalize(class_vectors.float(), dim=-1))
        self.logit_scale = logit_scale
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.head(self.backbone((images - self.mean) / self.std))
        if self.head_kind == "projection":
            return self.logit_scale * F.normalize(out, dim=-1) @ self.class_vectors.t()
        return out


def build_student(p, class_vectors: torch.Tensor, logit_scale: float, classes: list[str] | None = None,
                  small_clip=None, generator: torch.Generator | None = None) -> nn.Module:
    """The student `distill.student` names, from `distill.*` params.

    cnn: a ResNet (class_vectors, logit_scale: the teacher's). promptkd / kdpl: prompt students
    over `small_clip` (a ClipTeacher: the smaller pretrained CLIP), see prompt_students.py.
    """
    if p.student == "cnn":
        return CnnStudent(class_vectors, logit_scale, head=p.head, width=p.width, depth=p.depth,
                          backbone=p.backbone)
    from .prompt_students import KDPLStudent, PromptKDStudent

    if small_clip is None:
        raise ValueError(f"distill.student {p.student} needs the smaller CLIP (student_clip stage)")
    if p.student == "promptkd":
        return PromptKDStudent(small_clip, class_vectors, logit_scale, p.n_prompts, p.prompt_depth,
                               generator=generator)
    if p.student == "kdpl":
        return KDPLStudent(small_clip, classes, n_ctx=p.n_ctx, ctx_init=p.ctx_init, visual_prompts=p.visual_prompts,
                           visual_depth=max(1, p.prompt_depth), generator=generator)
    raise ValueError(f"unknown distill.student '{p.student}'")


def set_classes(student: nn.Module, classes: list[str], class_vectors: torch.Tensor) -> None:
    """Point any student at another class list (base or novel classes, or back from the KDPL-CA
    dictionary): CNN and PromptKD students take the teacher's class vectors, KDPL its own names."""
    if hasattr(student, "set_classnames"):
        student.set_classnames(classes)
    elif hasattr(student, "set_class_vectors"):
        student.set_class_vectors(class_vectors)
    else:
        student.class_vectors = F.normalize(class_vectors.float(), dim=-1).to(student.class_vectors.device)


def save_student(student: nn.Module, path) -> None:
    if not isinstance(student, CnnStudent):
        from .prompt_students import save_prompt_student

        return save_prompt_student(student, path)
    torch.save({"kind": "cnn", "head": student.head_kind, "backbone": student.backbone_name,
                "width": student.width, "depth": student.depth, "logit_scale": student.logit_scale,
                "class_vectors": student.class_vectors, "state_dict": student.state_dict()}, path)


def load_student(path, device="cpu") -> nn.Module:
    """Any student `save_student` wrote (its `kind` picks the loader), in eval mode on `device`."""
    from pathlib import Path

    from .runtime import PipelineError, read_checkpoint

    path = Path(path)
    blob = read_checkpoint(path, "student checkpoint", "distill", "kind")
    if blob["kind"] != "cnn":
        from .prompt_students import prompt_student_from_checkpoint

        return prompt_student_from_checkpoint(blob, path, device)
    try:
        model = CnnStudent(blob["class_vectors"], blob["logit_scale"], head=blob["head"], width=blob["width"],
                           depth=blob["depth"], backbone=blob.get("backbone", "cifar_resnet"))
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # any mismatched file is one error to the user
        raise PipelineError(f"student checkpoint {path} is unreadable or incompatible: {type(exc).__name__}") from None
    return model.to(device).eval()
