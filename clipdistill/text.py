"""Text-side helpers: template-ensembled class vectors and loading the stored ones."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .runtime import read_checkpoint


@torch.no_grad()
def class_vectors(teacher, classes: list[str], templates: list[str]) -> torch.Tensor:
    """Unit-norm [C, D]: per class, the normalised mean of its templates' unit text features."""
    feats = []
    for cls in classes:
        f = teacher.encode_text([t.format(cls) for t in templates])
        feats.append(F.normalize(f.mean(0), dim=-1))
    return torch.stack(feats)


def load_class_vectors(path: str | Path) -> dict:
    """The text_features stage's file: {classes, templates, features [C, D], logit_scale}."""
    path = Path(path)
    if path.is_dir():
        path = path / "class_vectors.pt"
    return read_checkpoint(path, "class vectors", "text_features", "features")
