"""Prompt methods: class names -> the text features that synthesis conditions on.

A method is a class with `generate()`, registered in METHODS by the name `prompts.method` uses.
Vanilla is "a photo of a {class}"; Xuan et al.'s Mix-, Random- and Contrastive-Prompt fill the
pseudo-word S* of "a {S*} style of a {class}" (Xuan et al., docs/design.md). Every method returns one
`PromptSet`: per prompt the class, a readable description, the text, the pseudo-word embedding
S* and the teacher text feature, computed by the one forward in `text_encoder`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .runtime import PipelineError, read_checkpoint, read_word_list
from .text_encoder import StyleTemplate, embedding_table, encode_with_pseudo_word

DEFAULT_STYLES = Path(__file__).parent / "assets" / "styles.txt"
PROMPT_COLUMNS = ("prompt_id", "class", "label", "method", "description", "text")  # prompts.csv, as table() writes it
ENCODE_CHUNK = 256  # prompts per text-tower forward when nothing is optimised (bounds memory on ViT-L)


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


def balanced_labels(n_classes: int, per_class: int) -> list[int]:
    """[0]*per_class + [1]*per_class + ...: prompts are grouped by class, in class order."""
    return [i for i in range(n_classes) for _ in range(per_class)]


@torch.no_grad()
def _encode_styled(enc: StyleTemplate, s_star: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """Unit-norm features [N, D] (on CPU) of the styled prompts, in chunks."""
    labels_t = torch.tensor(labels)
    return torch.cat([enc.encode(s_star[i:i + ENCODE_CHUNK], labels_t[i:i + ENCODE_CHUNK]).cpu()
                      for i in range(0, len(labels), ENCODE_CHUNK)])


def _styled_set(method: str, enc: StyleTemplate, labels: list[int], s_star: torch.Tensor, descriptions: list[str],
                features: torch.Tensor | None = None) -> PromptSet:
    s_star = s_star.detach().cpu()
    if features is None:
        features = _encode_styled(enc, s_star, labels)
    return PromptSet(classes=[enc.classes[i] for i in labels], labels=labels, method=method,
                     descriptions=descriptions, texts=[enc.text(y, d) for y, d in zip(labels, descriptions)],
                     features=features.detach().cpu(), s_star=s_star)


class VanillaPrompt:
    """The baseline: `template.format(class)` ("a photo of a {class}") for every prompt; images
    differ only by their random latent initialisation."""

    name = "vanilla"

    def __init__(self, params):
        self.template = params.template

    @torch.no_grad()
    def generate(self, teacher, classes: list[str], per_class: int, generator: torch.Generator) -> PromptSet:
        texts = [self.template.format(c) for c in classes]
        feats = encode_with_pseudo_word(teacher.model, teacher.tokenize(texts)).cpu()
        labels = balanced_labels(len(classes), per_class)
        return PromptSet(classes=[classes[i] for i in labels], labels=labels, method=self.name,
                         descriptions=["photo"] * len(labels), texts=[texts[i] for i in labels],
                         features=feats[labels])


# ---------------------------------------------------------------- Mix-Prompt

def load_styles(path: str | Path = "", what: str = "style dictionary",
                hint: str = " (set prompts.mix.styles_file)") -> list[str]:
    """The style dictionary: one style per line, '#' starts a comment; empty path = the shipped one."""
    return read_word_list(Path(path) if str(path) else DEFAULT_STYLES, what, hint)


def mix_weights(n: int, k: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """[n, k] convex weights ~ Dirichlet(alpha, ..., alpha); k = 2, alpha = 1 is lambda ~ U(0, 1).

    torch's Dirichlet takes no generator, so numpy draws them from a seed taken off `generator`:
    still one seed, still deterministic.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    w = np.random.default_rng(seed).dirichlet([alpha] * k, size=n)
    return torch.from_numpy(w).float()


def mix_embeddings(styles: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """S* = sum_j w_j * styles[index_j]. styles [S, W], index [N, k], weights [N, k] -> [N, W]."""
    return (weights[..., None] * styles[index]).sum(1)


class MixPrompt:
    """Mix-Prompt: S* is a convex mix of k distinct styles of a dictionary (default: 2 styles,
    weight lambda ~ U(0, 1), as the paper's interpolation); Dirichlet(alpha) over k in general."""

    name = "mix"

    def __init__(self, params):
        self.template = params.style_template
        self.styles = load_styles(params.mix.styles_file)
        self.k = params.mix.k
        self.alpha = params.mix.dirichlet_alpha
        if self.k > len(self.styles):
            raise PipelineError(f"prompts.mix.k = {self.k} exceeds the {len(self.styles)} styles of the dictionary")

    @torch.no_grad()
    def generate(self, teacher, classes: list[str], per_class: int, generator: torch.Generator) -> PromptSet:
        enc = StyleTemplate(teacher, self.template, classes)
        # Multi-token styles ("oil painting") are the mean of their tokens' embeddings.
        table = torch.stack([enc.word(s) for s in self.styles]).float().cpu()  # [S, W]
        labels = balanced_labels(len(classes), per_class)
        n = len(labels)
        index = torch.stack([torch.randperm(len(self.styles), generator=generator)[:self.k] for _ in range(n)])
        weights = mix_weights(n, self.k, self.alpha, generator)
        s_star = mix_embeddings(table, index, weights)
        descriptions = []
        for idx, w in zip(index.tolist(), weights.tolist()):
            parts = sorted(zip(w, idx), key=lambda t: -t[0])
            descriptions.append(" + ".join(f"{self.styles[i]} {wi:.2f}" for wi, i in parts))
        return _styled_set(self.name, enc, labels, s_star, descriptions)


# ---------------------------------------------------------------- Random-Prompt

def fit_gaussian(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension (mean [W], std [W]) of a token-embedding table [V, W], every row counted."""
    table = table.detach().float().cpu()
    return table.mean(0), table.std(0)


def sample_gaussian(mean: torch.Tensor, std: torch.Tensor, n: int, generator: torch.Generator,
                    scale: float = 1.0) -> torch.Tensor:
    """[n, W] draws of N(mean, (scale * std)^2), independent per dimension."""
    return mean + scale * std * torch.randn(n, mean.shape[0], generator=generator)


class RandomPrompt:
    """Random-Prompt: S* ~ a per-dimension Gaussian fitted to the teacher's token-embedding table,
    so styles need no dictionary. `prompts.random.scale` widens (> 1) or narrows the std."""

    name = "random"

    def __init__(self, params):
        self.template = params.style_template
        self.scale = params.random.scale
        # The paper fits every row. A teacher trained on a small vocabulary (the embedded one)
        # leaves most rows at their random init; `fit_words` fits the rows of words it knows.
        self.fit_words = (load_styles(params.random.fit_words, "word list", " (set prompts.random.fit_words)")
                          if params.random.fit_words else None)

    @torch.no_grad()
    def generate(self, teacher, classes: list[str], per_class: int, generator: torch.Generator) -> PromptSet:
        enc = StyleTemplate(teacher, self.template, classes)
        table = embedding_table(teacher.model)
        if self.fit_words:
            ids = sorted({i for w in self.fit_words for i in teacher._tokenizer.encode(w)})
            table = table[torch.tensor(ids, device=table.device)]
        mean, std = fit_gaussian(table)
        labels = balanced_labels(len(classes), per_class)
        s_star = sample_gaussian(mean, std, len(labels), generator, self.scale)
        return _styled_set(self.name, enc, labels, s_star, [f"random #{i}" for i in range(len(labels))])


# ---------------------------------------------------------------- Contrastive-Prompt

class MemoryBank:
    """FIFO of the features [M, D] of the last `size` finished prompts (size 0: always empty)."""

    def __init__(self, size: int, dim: int, device=None):
        self.size = size
        self.features = torch.empty(0, dim, device=device)

    def push(self, feats: torch.Tensor) -> None:
        if self.size > 0:
            self.features = torch.cat([self.features, feats.detach()])[-self.size:]


def contrastive_prompt_loss(feats: torch.Tensor, content: torch.Tensor, bank: torch.Tensor, temperature: float,
                            content_weight: float) -> torch.Tensor:
    """InfoNCE in text-feature space + a content term; all features unit-norm.

    feats [B, D]: the prompts being optimised; content [B, D]: each prompt's class content feature;
    bank [M, D]: earlier prompts. InfoNCE is instance discrimination: each prompt is its own
    positive (logit 1 / temperature), the other B - 1 prompts and the bank are its negatives, so
    it equals log(1 + sum_neg exp((cos - 1) / temperature)) and only pushes prompts apart. The
    content term, content_weight * (1 - cos(prompt, content)), keeps the class. Batch mean.
    """
    # The paper names no positive; a prompt's own feature needs no text augmentation, and leaves
    # the pull towards the class to the content term alone (one weight for one trade-off).
    sims = torch.cat([feats @ feats.t(), feats @ bank.t()], dim=1) / temperature  # [B, B + M]
    nce = -F.log_softmax(sims, dim=1).diagonal().mean()
    return nce + content_weight * (1 - (feats * content).sum(-1)).mean()


class ContrastivePrompt:
    """Contrastive-Prompt: S* learnable per prompt, started from a Random-Prompt draw, optimised
    with Adam on `contrastive_prompt_loss` so each prompt moves away from the others in its batch
    and from the memory bank of earlier prompts while its class survives.

    Prompts are visited in a random order (batches mix classes) in batches of `batch_size`; each
    batch takes `steps` Adam steps, then its final features enter the FIFO bank. `losses` keeps
    the per-step loss of each batch of the last `generate()`.
    """

    name = "contrastive"

    def __init__(self, params):
        self.template = params.style_template
        self.scale = params.random.scale
        self.contrastive = params.contrastive
        self.losses: list[list[float]] = []

    def generate(self, teacher, classes: list[str], per_class: int, generator: torch.Generator) -> PromptSet:
        settings = self.contrastive  # prompts.contrastive.*
        enc = StyleTemplate(teacher, self.template, classes)
        device = enc.tokens.device
        with torch.no_grad():
            content = encode_with_pseudo_word(teacher.model,
                                              teacher.tokenize([settings.content_template.format(c) for c in classes]))
            mean, std = fit_gaussian(embedding_table(teacher.model))
        labels = balanced_labels(len(classes), per_class)
        n = len(labels)
        # Initialised as Random-Prompt (same fitted Gaussian, prompts.random.scale): the contrastive
        # step is a refinement of random styles, not a search from zero.
        s_star = sample_gaussian(mean, std, n, generator, self.scale)
        # A random visiting order mixes classes in each batch, so same-class prompts repel each
        # other both inside a batch and through the bank.
        order = torch.randperm(n, generator=generator)
        labels_t = torch.tensor(labels)
        feats = torch.empty(n, content.shape[1])
        bank = MemoryBank(settings.bank_size, content.shape[1], device)
        self.losses = []
        for batch in order.split(settings.batch_size):
            y = labels_t[batch].to(device)
            s = s_star[batch].to(device).requires_grad_(True)
            opt = torch.optim.Adam([s], lr=settings.lr)
            history = []
            for _ in range(settings.steps):
                loss = contrastive_prompt_loss(enc.encode(s, y), content[y], bank.features, settings.temperature,
                                               settings.content_weight)
                # Gradient for S* only: the teacher stays untouched even if its weights require grad.
                (s.grad,) = torch.autograd.grad(loss, [s])
                opt.step()
                history.append(loss.item())
            self.losses.append(history)
            with torch.no_grad():
                f = enc.encode(s, y)
            # Only finished prompts enter the bank (not every step's features, as MoCo would): a
            # batch must not be pushed away from its own earlier states.
            bank.push(f)
            feats[batch] = f.cpu()
            s_star[batch] = s.detach().cpu()
        return _styled_set(self.name, enc, labels, s_star, [f"contrastive #{i}" for i in range(n)], features=feats)


METHODS = {cls.name: cls for cls in (VanillaPrompt, MixPrompt, RandomPrompt, ContrastivePrompt)}


def build_method(params):
    """The method `prompts.method` names, configured from `prompts.*`."""
    return METHODS[params.method](params)


def save_prompts(prompts: PromptSet, out_dir) -> None:
    prompts.table().to_csv(out_dir / "prompts.csv", index=False)
    torch.save({"features": prompts.features, "s_star": prompts.s_star, "method": prompts.method},
               out_dir / "features.pt")


def load_prompts(out_dir) -> tuple[pd.DataFrame, torch.Tensor]:
    """(table, features [N, D]) as the prompts stage wrote them."""
    out_dir = Path(out_dir)
    table_path, features_path = out_dir / "prompts.csv", out_dir / "features.pt"
    if not table_path.is_file():
        raise PipelineError(f"prompts not found: {table_path} (run the prompts stage)")
    features = read_checkpoint(features_path, "prompt features", "prompts", "features")["features"]
    try:
        table = pd.read_csv(table_path, keep_default_na=False)
        table[list(PROMPT_COLUMNS)]
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, KeyError) as exc:
        raise PipelineError(f"prompts table {table_path} is unreadable: {type(exc).__name__} "
                            f"{(str(exc).splitlines() or [''])[0][:120]}") from None
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != len(table):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise PipelineError(f"prompt features {features_path} ({shape}) do not match the {len(table)} prompts of "
                            f"{table_path}: rerun the prompts stage")
    return table, features
