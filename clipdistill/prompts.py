"""Prompt methods: class names -> the text features that synthesis conditions on.

A method is a class with `generate()`, registered in METHODS by the name `prompts.method` uses;
adding Mix-/Random-/Contrastive-Prompt means adding a class here. Every method returns one
`PromptSet`: per prompt the class, a readable description, the text, the optional pseudo-word
embedding S*, and the teacher text feature that synthesis must match.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch


@dataclass
class PromptSet:
    classes: list[str]               # per prompt, the class name
    labels: list[int]                # per prompt, the class index in world.classes
    method: str
    descriptions: list[str]          # readable: the style words, or "random #17"
    texts: list[str]                 # the prompt as text (S* shown as its description)
    features: torch.Tensor           # unit-norm teacher text features [N, D]
    s_star: torch.Tensor | None = field(default=None)  # pseudo-word embeddings [N, E], if any

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"prompt_id": range(len(self.texts)), "class": self.classes, "label": self.labels,
                             "method": self.method, "description": self.descriptions, "text": self.texts})


class VanillaPrompt:
    """The baseline: `template.format(class)` ("a photo of a {class}") for every prompt; images
    differ only by their random latent initialisation."""

    name = "vanilla"

    def __init__(self, params):
        self.template = params.template

    @torch.no_grad()
    def generate(self, teacher, classes: list[str], per_class: int, generator: torch.Generator) -> PromptSet:
        texts = [self.template.format(c) for c in classes]
        feats = teacher.encode_text(texts).cpu()
        labels = [i for i in range(len(classes)) for _ in range(per_class)]
        return PromptSet(classes=[classes[i] for i in labels], labels=labels, method=self.name,
                         descriptions=["photo"] * len(labels), texts=[texts[i] for i in labels],
                         features=feats[labels])


METHODS = {cls.name: cls for cls in (VanillaPrompt,)}


def build_method(params):
    """The method `prompts.method` names, configured from `prompts.*`."""
    if params.method not in METHODS:
        raise ValueError(f"unknown prompts.method '{params.method}'; choose one of {', '.join(METHODS)}")
    return METHODS[params.method](params)


def save_prompts(prompts: PromptSet, out_dir) -> None:
    prompts.table().to_csv(out_dir / "prompts.csv", index=False)
    torch.save({"features": prompts.features, "s_star": prompts.s_star, "method": prompts.method},
               out_dir / "features.pt")


def load_prompts(out_dir) -> tuple[pd.DataFrame, torch.Tensor]:
    """(table, features [N, D]) as the prompts stage wrote them."""
    from pathlib import Path

    from .runtime import PipelineError

    out_dir = Path(out_dir)
    if not (out_dir / "prompts.csv").is_file():
        raise PipelineError(f"prompts not found: {out_dir / 'prompts.csv'} (run the prompts stage)")
    blob = torch.load(out_dir / "features.pt", map_location="cpu", weights_only=True)
    return pd.read_csv(out_dir / "prompts.csv", keep_default_na=False), blob["features"]
