"""CLIP's text tower run from token embeddings, so learned vectors can stand in for tokens.

Xuan et al.'s prompts "a {S*} style of a {class}" carry a style embedding that is no word of the
vocabulary, and CoOp/KDPL prompts carry n_ctx learned context vectors: both forwards below are
open_clip's `CLIP.encode_text` with token rows replaced.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from .runtime import PipelineError

# The placeholder written where S* goes before tokenizing. '*' is one BPE token (id 265) in CLIP's
# vocabulary, as textual inversion uses it, and CLIP's pre-tokenizer splits punctuation from
# neighbouring letters, so it never merges with the words around it.
PLACEHOLDER = "*"


def _check_clip(model) -> None:
    if not hasattr(model, "token_embedding"):
        raise PipelineError(f"pseudo-word prompts need an open_clip.CLIP text tower; "
                            f"{type(model).__name__} has no token_embedding")


def embedding_table(model) -> torch.Tensor:
    """The token-embedding table [V, W] of an open_clip.CLIP (W = text transformer width)."""
    _check_clip(model)
    return model.token_embedding.weight


def word_embedding(model, tokenizer, word: str) -> torch.Tensor:
    """[W]: the token embedding of `word`; a word of several BPE tokens gets their mean."""
    ids = tokenizer.encode(word)
    if not ids:
        raise PipelineError(f"'{word}' has no tokens in the CLIP vocabulary")
    return embedding_table(model)[torch.tensor(ids, device=model.token_embedding.weight.device)].mean(0)


def placeholder_position(tokenizer, text: str, slot: str = "{style}") -> int:
    """Token index of the S* slot in `text` (the start token is index 0).

    CLIP's BPE works word by word, so the tokens before the slot do not depend on what follows it.
    """
    if slot not in text:
        raise PipelineError(f"prompt template '{text}' has no {slot} slot")
    return 1 + len(tokenizer.encode(text.split(slot)[0]))


def encode_with_pseudo_word(model, tokens: torch.Tensor, s_star: torch.Tensor | None = None,
                            positions: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """open_clip CLIP.encode_text with S* substituted at one token per prompt.

    model: open_clip.CLIP; tokens: [N, L] ids (the placeholder's id at the S* position, which
    keeps the EOT token the argmax for 'argmax' pooling); s_star: [N, W] or None (= plain
    encode_text); positions: [N] token index of S* per prompt. Returns features [N, D],
    unit-norm when `normalize`. Differentiable in s_star.
    """
    _check_clip(model)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # [N, L, W]
    if s_star is not None:
        if positions is None:
            raise ValueError("encode_with_pseudo_word needs `positions` with `s_star`")
        slot = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        slot[torch.arange(tokens.shape[0], device=tokens.device), positions] = True
        x = torch.where(slot[..., None], s_star.to(cast_dtype)[:, None, :], x)
    return encode_token_embeddings(model, x, tokens, normalize)


def encode_with_context(model, tokens: torch.Tensor, ctx: torch.Tensor, start: int = 1,
                        normalize: bool = True) -> torch.Tensor:
    """CoOp's text forward: token rows start .. start+n_ctx of every prompt replaced by `ctx`.

    model: open_clip.CLIP; tokens: [N, L] ids whose rows start .. start+n_ctx hold placeholder
    words (they only keep the EOT token where 'argmax' pooling looks for it); ctx: [n_ctx, W]
    shared by all prompts, or [N, n_ctx, W]. Returns features [N, D], unit-norm when `normalize`.
    Differentiable in ctx.
    """
    _check_clip(model)
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # [N, L, W]
    ctx = ctx.to(cast_dtype)
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    x = torch.cat([x[:, :start], ctx, x[:, start + ctx.shape[1]:]], dim=1)
    return encode_token_embeddings(model, x, tokens, normalize)


def encode_token_embeddings(model, x: torch.Tensor, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The rest of open_clip's CLIP.encode_text, from token embeddings x [N, L, W] (cast dtype).

    tokens [N, L] are only used for pooling (the EOT position). Returns [N, D].
    """
    cast_dtype = model.transformer.get_cast_dtype()
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


class StyleTemplate:
    """A teacher, a template "a {style} style of a {class}" and the classes, tokenized once.

    `encode(s_star [N, W], labels [N])` is the text feature [N, D] (unit-norm) of each prompt with
    its S* in the style slot; `text(label, description)` is the prompt as readable text.
    """

    def __init__(self, teacher, template: str, classes: list[str]):
        for slot in ("{style}", "{class}"):
            if template.count(slot) != 1:
                raise PipelineError(f"prompt template '{template}' needs exactly one {slot}")
        self.teacher = teacher
        self.template = template
        self.classes = list(classes)
        tokenizer = teacher._tokenizer
        per_class = [template.replace("{class}", c) for c in self.classes]
        self.tokens = teacher.tokenize([t.replace("{style}", PLACEHOLDER) for t in per_class])  # [C, L]
        # per class: the class name may come before the slot and take several tokens
        self.positions = torch.tensor([placeholder_position(tokenizer, t) for t in per_class],
                                      device=self.tokens.device)  # [C]
        placeholder_id = tokenizer.encode(PLACEHOLDER)[0]
        length = self.tokens.shape[1]
        rows = torch.arange(len(self.classes), device=self.tokens.device)
        if bool((self.positions >= length - 1).any()) or bool((self.tokens[rows, self.positions] != placeholder_id).any()):
            raise PipelineError(f"prompt template '{template}': the style slot does not survive tokenization "
                                f"(context length {length})")

    @property
    def model(self):
        return self.teacher.model

    def word(self, word: str) -> torch.Tensor:
        """[W]: a real word's embedding (the mean of its BPE tokens' embeddings)."""
        return word_embedding(self.model, self.teacher._tokenizer, word)

    def encode(self, s_star: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=self.tokens.device)
        return encode_with_pseudo_word(self.model, self.tokens[labels], s_star.to(self.tokens.device),
                                       self.positions[labels])

    def text(self, label: int, description: str) -> str:
        return self.template.replace("{style}", f"[{description}]").replace("{class}", self.classes[label])
