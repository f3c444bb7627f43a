"""Prompt-learning students: a smaller CLIP kept frozen, adapted only through prompts.

PromptKD (Li et al., CVPR 2024): deep visual prompts + a projector into the teacher's space;
logits against the teacher's stored class vectors, no text encoder at inference.
KDPL (Mistretta et al., ECCV 2024): CoOp text context (+ optional visual prompts) through the
student's own text tower; optionally class-agnostic over a large name dictionary (KDPL-CA).
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from .clip_models import (ClipModel, ConvImageTower, CosineClassifier, build_clip, clip_logit_scale, clip_preprocess, model_preprocess,
                          load_open_clip)
from .losses import Outputs
from .params import ParamsError
from .runtime import PipelineError, read_word_list
from .text_encoder import encode_with_context

DEFAULT_CLASSNAMES = Path(__file__).parent / "assets" / "classnames.txt"
PROMPT_STD = 0.02  # VPT / PromptSRC / PromptKD initialise visual prompts from N(0, 0.02)


# ---------------------------------------------------------------- visual prompts

class VitPrompts(nn.Module):
    """VPT-deep on open_clip's VisionTransformer (a mirror of open_clip 3.3's forward).

    `n_prompts` tokens [n, W] per layer for the first `depth` layers, placed after the class
    token. As in PromptSRC/PromptKD (IVLP), layer 0's prompts join the sequence after the
    positional embedding and before `ln_pre`, so they are normalised like the patch tokens; layers
    1 .. depth-1 replace the previous layer's prompt outputs with their own; from layer `depth` on
    the prompt outputs flow on; they are dropped before pooling (this matters for 'avg' pooling
    only: 'tok' pooling reads the class token). Prompts carry no positional embedding, so their
    place in the sequence does not change the result. depth 0 (or n 0) is the plain forward.
    normalised [B, 3, S, S] -> [B, out_dim].
    """

    def __init__(self, visual: VisionTransformer, n_prompts: int, depth: int, generator=None,
                 depth_key: str = "prompt_depth"):
        super().__init__()
        layers = len(visual.transformer.resblocks)
        if not 0 <= depth <= layers:
            raise ParamsError(f"params key '{depth_key}': visual prompt depth {depth} must be "
                              f"within 0..{layers} (the ViT image tower's layers)")
        if not visual.transformer.batch_first:
            raise PipelineError("visual prompts need a batch-first open_clip transformer (open_clip >= 3)")
        self.visual = visual
        self.n_prompts = n_prompts if depth > 0 else 0
        self.depth = depth if n_prompts > 0 else 0
        width = visual.conv1.out_channels
        self.prompts = None
        if self.n_prompts:
            init = torch.randn(self.depth, self.n_prompts, width, generator=generator)
            self.prompts = nn.Parameter(PROMPT_STD * init)
        self.out_dim = visual.proj.shape[1] if visual.proj is not None else width

    def _with_prompts(self, x: torch.Tensor, layer: int, replace: bool) -> torch.Tensor:
        prompts = self.prompts[layer].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        rest = x[:, 1 + self.n_prompts:] if replace else x[:, 1:]
        return torch.cat([x[:, :1], prompts, rest], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        # open_clip VisionTransformer._embeds, with the layer-0 prompts joining before ln_pre
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid**2, W]
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)  # identity: the frozen tower stays in eval mode
        if self.n_prompts:
            x = self._with_prompts(x, 0, replace=False)
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            if self.n_prompts and 0 < i < self.depth:
                x = self._with_prompts(x, i, replace=True)
            x = block(x)
        if self.n_prompts:
            x = torch.cat([x[:, :1], x[:, 1 + self.n_prompts:]], dim=1)
        pooled, _ = v._pool(x)
        return pooled @ v.proj if v.proj is not None else pooled


class ConvPrompts(nn.Module):
    """The conv analogue of VPT-deep for the embedded ConvImageTower, which has no tokens.

    Our choice (the papers only prompt ViTs): each of the first `depth` conv stages gets a
    learnable additive prompt map [C_in, n, n] (init N(0, 0.02)), bilinearly upsampled to the
    stage's input size and added to its input, so `n_prompts` is the side of a coarse prompt grid
    (n = 1: a per-channel shift; larger n: spatially varying prompts, like the pixel-space visual
    prompts of Bahng et al. 2022 at stage 0). Parameters stay a few hundred for any image size.
    depth 0 (or n 0) is the plain forward. normalised [B, 3, S, S] -> [B, out_dim].
    """

    def __init__(self, visual: ConvImageTower, n_prompts: int, depth: int, generator=None,
                 depth_key: str = "prompt_depth"):
        super().__init__()
        # stages = runs of modules that start at a conv (conv, BN, ReLU, pool in ConvImageTower)
        starts = [i for i, m in enumerate(visual.features) if isinstance(m, nn.Conv2d)] + [len(visual.features)]
        self.stage_bounds = list(zip(starts[:-1], starts[1:]))
        if not 0 <= depth <= len(self.stage_bounds):
            raise ParamsError(f"params key '{depth_key}': visual prompt depth {depth} must be "
                              f"within 0..{len(self.stage_bounds)} (the conv image tower's stages)")
        self.visual = visual
        self.n_prompts = n_prompts if depth > 0 else 0
        self.depth = depth if n_prompts > 0 else 0
        self.prompts = nn.ParameterList([
            nn.Parameter(PROMPT_STD * torch.randn(1, visual.features[s].in_channels, self.n_prompts, self.n_prompts,
                                                  generator=generator))
            for s, _ in self.stage_bounds[:self.depth]])
        self.out_dim = visual.proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        for i, (a, b) in enumerate(self.stage_bounds):
            if i < self.depth:
                x = x + F.interpolate(self.prompts[i].to(x.dtype), size=x.shape[-2:], mode="bilinear",
                                      align_corners=False)
            x = v.features[a:b](x)
        return v.proj(x.mean(dim=(2, 3)))


# The image towers that can take prompts; another tower is one entry here plus its class.
PROMPTED_TOWERS = {VisionTransformer: VitPrompts, ConvImageTower: ConvPrompts}


def prompted_image_encoder(visual: nn.Module, n_prompts: int, depth: int, generator=None,
                           depth_key: str = "prompt_depth") -> nn.Module:
    """Wrap a CLIP image tower with visual prompts (VitPrompts or ConvPrompts by tower type);
    `depth_key` is the params key an out-of-range depth error names."""
    for tower, cls in PROMPTED_TOWERS.items():
        if isinstance(visual, tower):
            return cls(visual, n_prompts, depth, generator, depth_key)
    raise PipelineError(f"visual prompts support {', '.join(t.__name__ for t in PROMPTED_TOWERS)} image towers, "
                        f"not {type(visual).__name__}")


def _unwrap(clip, spec: dict | None, image_size: int | None, context_length: int | None):
    """(open_clip.CLIP, spec, image_size, context_length) from a ClipModel or a bare CLIP."""
    if isinstance(clip, ClipModel):
        return clip.model, clip.spec, clip.image_size, clip.context_length
    if image_size is None:
        size = getattr(clip.visual, "image_size", None)
        image_size = size[0] if isinstance(size, (tuple, list)) else size
    if image_size is None:
        raise ValueError("image_size is needed for an image tower that does not declare it")
    return clip, spec, int(image_size), context_length or getattr(clip, "context_length", None)


class _FrozenClipStudent(nn.Module):
    """Shared plumbing: CLIP input convention, a frozen CLIP part kept in eval mode."""

    frozen_prefixes: tuple[str, ...] = ()

    def _init_io(self, model, image_size: int):
        """The small CLIP's input convention: its size, and its own mean and std."""
        self.image_size = image_size
        prep = model_preprocess(model, image_size)
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self.image_size, self.mean, self.std)

    def train(self, mode: bool = True):
        # The frozen CLIP must not update BatchNorm statistics (the conv tower has BN) or run
        # dropout while the prompts train: it stays in eval mode whatever the student's mode.
        super().train(mode)
        for prefix in self.frozen_prefixes:
            self.get_submodule(prefix.rstrip(".")).eval()
        return self

    def trainable_state(self) -> dict:
        """state_dict without the frozen CLIP: prompts, projector (with BN statistics), buffers."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}

    # Checkpoints: the small CLIP's spec (its weights too when no name + pretrained tag can
    # restore them), the hyper-parameters (`_config`) and the trainable state.
    frozen_module = ""  # the frozen CLIP part whose weights a checkpoint stores when needed

    def checkpoint(self) -> dict:
        if self.spec is None:
            raise ValueError("this student has no spec of its CLIP (build it from a ClipModel or pass spec=)")
        blob = {"spec": self.spec, "image_size": self.image_size, "trainable": self.trainable_state(),
                "config": self._config()}
        if _stores_weights(self.spec):
            blob["frozen"] = self.get_submodule(self.frozen_module).state_dict()
        return blob

    @classmethod
    def from_checkpoint(cls, blob: dict, path: Path):
        try:
            spec = blob["spec"]
            if spec["kind"] == "open_clip":  # weights from the tag, or random then overwritten below
                model = load_open_clip(spec["model"], spec["pretrained"]).model
            else:
                model = build_clip(spec["config"])
            student = cls(model, image_size=blob["image_size"], spec=spec, **blob["config"])
            if "frozen" in blob:
                student.get_submodule(student.frozen_module).load_state_dict(blob["frozen"])
            missing, unexpected = student.load_state_dict(blob["trainable"], strict=False)
            missing = [k for k in missing if not k.startswith(student.frozen_prefixes)]
            if missing or unexpected:
                raise KeyError((missing + unexpected)[0])
        except PipelineError:
            raise
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise PipelineError(f"student checkpoint {path} does not match its model: "
                                f"{type(exc).__name__} {str(exc).splitlines()[0][:120]}") from None
        return student


# ---------------------------------------------------------------- PromptKD

class PromptKDStudent(_FrozenClipStudent):
    """PromptKD's student: frozen smaller-CLIP image tower + deep visual prompts + projector.

    clip: open_clip.CLIP or ClipTeacher (then spec, image size come from it); only its image
    tower is kept (PromptKD needs no student text encoder). class_vectors [C, D_teacher]: the
    teacher's stored class text features, shared for training and inference (re-normalised and
    kept as a buffer, never trained). forward(images [B, 3, H, W] in [0, 1], any size) -> logits
    [B, C] = logit_scale * cos(projector(image feature), class vector). Trainable: prompts and
    projector only.
    """

    kind = "promptkd"
    frozen_prefixes = ("encoder.visual.",)
    frozen_module = "encoder.visual"

    def __init__(self, clip, class_vectors: torch.Tensor, logit_scale: float, *, n_prompts: int, prompt_depth: int,
                 image_size: int | None = None, spec: dict | None = None, generator=None):
        super().__init__()
        model, spec, image_size, _ = _unwrap(clip, spec, image_size, None)
        self._init_io(model, image_size)
        self.spec = spec
        self.encoder = prompted_image_encoder(model.visual, n_prompts, prompt_depth, generator,
                                              "distill.promptkd.prompt_depth")
        self.encoder.visual.requires_grad_(False)
        teacher_dim = class_vectors.shape[1]
        # PromptKD's projector: 1x1 conv (student dim -> teacher dim), BN, ReLU, 1x1 conv; on a
        # pooled feature a 1x1 conv is a Linear. Its input is the student CLIP's image embedding
        # (after the tower's own projection), as in PromptKD (512 -> 768 for B/16 -> L/14).
        self.projector = nn.Sequential(nn.Linear(self.encoder.out_dim, teacher_dim), nn.BatchNorm1d(teacher_dim),
                                       nn.ReLU(), nn.Linear(teacher_dim, teacher_dim))
        self.register_buffer("class_vectors", F.normalize(class_vectors.detach().float(), dim=-1))
        self.logit_scale = float(logit_scale)
        self.encoder.visual.eval()

    @property
    def n_prompts(self) -> int:
        return self.encoder.n_prompts

    @classmethod
    def from_params(cls, section, *, class_vectors, logit_scale, classes, clip, generator):
        """From `distill.promptkd` (n_prompts, prompt_depth) over the smaller CLIP `clip`."""
        return cls(clip, class_vectors, logit_scale, n_prompts=section.n_prompts, prompt_depth=section.prompt_depth,
                   generator=generator)

    def classifier(self) -> nn.Module:
        """For export: itself (prompts and projector are weights, class vectors a buffer)."""
        return self

    def _config(self) -> dict:
        return {"class_vectors": self.class_vectors, "logit_scale": self.logit_scale, "n_prompts": self.n_prompts,
                "prompt_depth": self.encoder.depth}

    def set_classes(self, classes: list[str], class_vectors: torch.Tensor) -> None:
        """Swap the class list (e.g. novel classes): [C', D_teacher] teacher text features."""
        if class_vectors.shape[1] != self.class_vectors.shape[1]:
            raise ValueError(f"class vectors of width {class_vectors.shape[1]}, the projector gives "
                             f"{self.class_vectors.shape[1]}")
        self.class_vectors = F.normalize(class_vectors.detach().float(), dim=-1).to(self.class_vectors.device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> unit-norm [B, D_teacher] in the teacher's embedding space."""
        return F.normalize(self.projector(self.encoder(self.preprocess(images))), dim=-1)

    def forward(self, images: torch.Tensor, features: bool = False) -> "torch.Tensor | Outputs":
        """Logits [B, C]; with `features`, `Outputs(logits, projector output [B, D_teacher])` for
        the feature losses."""
        projected = self.projector(self.encoder(self.preprocess(images)))
        logits = self.logit_scale * F.normalize(projected, dim=-1) @ self.class_vectors.t()
        return Outputs(logits, projected) if features else logits


# ---------------------------------------------------------------- KDPL

class KDPLStudent(_FrozenClipStudent):
    """KDPL's student: a frozen small CLIP with CoOp context (+ optional visual prompts).

    Text prompt per class = [SOS] ctx_1 .. ctx_n classname . [EOS]: n_ctx context vectors shared
    by all classes, initialised from the token embeddings of `ctx_init` (n_ctx must equal its
    token count; empty ctx_init = N(0, 0.02) init, as CoOp), through the frozen text tower.
    Logits [B, K] = exp(logit_scale) (clamped at 100) * cos(image feature, text features).
    `n_prompts` > 0 adds the PromptKD visual prompts (VPT-deep / conv analogue) to the first
    `prompt_depth` layers. Trainable: ctx (+ visual prompts) only. clip: open_clip.CLIP or ClipModel.
    """

    kind = "kdpl"
    frozen_prefixes = ("clip.", "encoder.visual.")
    frozen_module = "clip"

    def __init__(self, clip, classnames: list[str], *, n_ctx: int, ctx_init: str, n_prompts: int, prompt_depth: int,
                 image_size: int | None = None,
                 context_length: int | None = None, spec: dict | None = None, generator=None):
        super().__init__()
        model, spec, image_size, context_length = _unwrap(clip, spec, image_size, context_length)
        self._init_io(model, image_size)
        self.spec = spec
        self.clip = model.requires_grad_(False).eval()
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length or model.context_length)
        # no visual prompts: no depth to check against the tower (the text context alone trains)
        self.encoder = prompted_image_encoder(model.visual, n_prompts, prompt_depth if n_prompts else 0, generator,
                                              "distill.kdpl.prompt_depth")
        self.ctx_init = ctx_init
        if ctx_init:
            init_ids = self.tokenizer.encode(ctx_init)
            if len(init_ids) != n_ctx:
                raise ParamsError(f"params key 'distill.kdpl.ctx_init' '{ctx_init}' is {len(init_ids)} tokens, "
                                  f"distill.kdpl.n_ctx is {n_ctx}: make them agree")
            with torch.no_grad():
                ctx = model.token_embedding.weight[torch.tensor(init_ids)].detach().clone()
            self.prefix = ctx_init
        else:
            ctx = PROMPT_STD * torch.randn(n_ctx, model.token_embedding.weight.shape[1], generator=generator)
            self.prefix = " ".join(["X"] * n_ctx)  # CoOp's placeholder words, replaced by ctx
        self.ctx = nn.Parameter(ctx.float())
        self.set_classnames(classnames)

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    @property
    def logit_scale(self) -> float:
        return clip_logit_scale(self.clip)

    @classmethod
    def from_params(cls, section, *, class_vectors, logit_scale, classes, clip, generator):
        """From `distill.kdpl` (n_ctx, ctx_init, n_prompts, prompt_depth) over the smaller CLIP `clip`;
        KDPL scores with its own text tower, so the teacher's class vectors are not kept."""
        return cls(clip, classes, n_ctx=section.n_ctx, ctx_init=section.ctx_init, n_prompts=section.n_prompts,
                   prompt_depth=section.prompt_depth, generator=generator)

    def _config(self) -> dict:
        return {"classnames": self.classnames, "n_ctx": self.n_ctx, "ctx_init": self.ctx_init,
                "n_prompts": self.encoder.n_prompts, "prompt_depth": self.encoder.depth,
                "context_length": self.tokenizer.context_length}

    @torch.no_grad()
    def classifier(self) -> nn.Module:
        """For export: the prompted image tower against its learned text features, computed once
        for the current classes (the text tower is not needed at inference)."""
        return CosineClassifier(self.encoder, self.image_size, self.mean, self.std, self.text_features(),
                                self.logit_scale)

    def set_classes(self, classes: list[str], class_vectors: torch.Tensor) -> None:
        """Point the student at `classes` (base, novel, or back from the KDPL-CA dictionary)."""
        self.set_classnames(classes)

    def set_classnames(self, names: list[str]) -> None:
        """Swap the class list (dataset classes, the KDPL-CA dictionary, novel classes)."""
        if not names:
            raise ValueError("KDPL student needs at least one class name")
        prompts = [f"{self.prefix} {n.replace('_', ' ')}." for n in names]
        tokens = self.tokenizer(prompts)
        if tokens.shape[1] < self.n_ctx + 3:
            raise ParamsError(f"params key 'distill.kdpl.n_ctx' {self.n_ctx}: the small CLIP's context length "
                              f"{tokens.shape[1]} leaves no room for {self.n_ctx} context tokens")
        # the context must survive tokenization at rows 1 .. n_ctx (CLIP's BPE is word by word)
        expected = torch.tensor(self.tokenizer.encode(self.prefix))
        if not bool((tokens[:, 1:1 + self.n_ctx] == expected).all()):
            raise ValueError("the context words do not tokenize to rows 1..n_ctx of every prompt")
        self.classnames = list(names)
        self.register_buffer("tokens", tokens.to(self.ctx.device), persistent=False)

    def text_features(self, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unit-norm [K, D] for the classes `class_ids` (all when None); differentiable in ctx."""
        tokens = self.tokens if class_ids is None else self.tokens[class_ids.to(self.tokens.device)]
        return encode_with_context(self.clip, tokens, self.ctx)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> unit-norm [B, D]."""
        return F.normalize(self.encoder(self.preprocess(images)), dim=-1)

    def forward(self, images: torch.Tensor, class_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K] over `class_ids` (LongTensor [K]) or over every class name."""
        return self.logit_scale * self.image_features(images) @ self.text_features(class_ids).t()


def select_topk_classes(teacher_probs: torch.Tensor, k: int) -> torch.Tensor:
    """KDPL-CA: the k classes with the highest batch-mean teacher probability.

    teacher_probs [B, C_all] -> LongTensor [k] of class ids, in ascending order (KDPL takes an
    unordered argpartition; sorting makes k = C_all return 0..C-1, i.e. plain KDPL exactly).
    Under torchrun the mean is over the global batch (all ranks' slices), so every rank scores
    the same k classes, as one process would.
    """
    n = teacher_probs.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"top-k of {k} classes out of {n}: k must be within 1..{n}")
    mean = teacher_probs.float().mean(0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    return mean.topk(k).indices.sort().values


def class_agnostic_logits(student: KDPLStudent, images: torch.Tensor, teacher_logits: torch.Tensor, k: int):
    """KDPL-CA's step: (student logits [B, k], teacher logits [B, k], class ids [k]).

    teacher_logits [B, C_all] over the student's current class names (the dictionary). The
    classes are chosen from the teacher's softmax over all C_all classes, then both sides are
    restricted to them (the loss re-normalises over the k), as KDPL's `sampling` does.
    Only the k selected prompts go through the student's text tower.
    """
    ids = select_topk_classes(teacher_logits.detach().softmax(-1), k)
    return student(images, ids), teacher_logits[:, ids.to(teacher_logits.device)], ids


# ---------------------------------------------------------------- class-name dictionary

def load_classnames(path: str | Path = "") -> list[str]:
    """A class-name dictionary: one name per line, '#' starts a comment; empty path = the shipped
    clipdistill/assets/classnames.txt (KDPL-CA's stand-in for its ~21k-name dictionary)."""
    return read_word_list(Path(path) if str(path) else DEFAULT_CLASSNAMES, "class-name dictionary",
                      " (set distill.classnames_file)")


# ---------------------------------------------------------------- checkpoints

def _stores_weights(spec: dict) -> bool:
    """Embedded CLIPs (and open_clip ones without pretrained weights) cannot be rebuilt from a name."""
    return not (spec["kind"] == "open_clip" and spec.get("pretrained"))
