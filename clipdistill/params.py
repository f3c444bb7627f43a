"""The one config source: `params.yaml` parsed into typed dataclasses and validated.

Every stage calls `load_params()` first, so an unknown key, a wrong type or an empty class list
fails at stage start with one line naming the key, before anything is written. A key left out of
a params file takes its dataclass default, which is params.yaml's value (tested).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .runtime import PipelineError


class ParamsError(PipelineError, ValueError):
    """A params.yaml problem; the message is one line naming the key."""


@dataclass(frozen=True)
class WorldParams:
    classes: list[str]
    source: str = "embedded"       # embedded (render the procedural world) | folder (a PACS-style folder)
    root: str = ""                 # source folder: <root>/<domain>/<class>/* images, evaluated per domain
    image_size: int = 32
    eval_domains: list[str] = field(default_factory=lambda: ["photo", "painting", "cartoon", "sketch"])
    train_styles: list[str] = field(default_factory=lambda: ["photo", "painting", "cartoon", "sketch", "neon",
                                                             "silhouette", "mosaic"])
    train_per_class_style: int = 80
    test_per_class_domain: int = 60


@dataclass(frozen=True)
class TeacherParams:
    source: str = "embedded"
    open_clip_model: str = "ViT-B-32"
    pretrained: str = ""
    vision: str = "convnet"
    embed_dim: int = 64
    vision_width: int = 24
    vision_layers: int = 4
    vision_heads: int = 4
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 16
    epochs: int = 16
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 0.1
    checkpoint_every: int = 100    # steps between resumable training-state saves (0 = only at the end)


@dataclass(frozen=True)
class StudentClipParams(TeacherParams):
    """The smaller CLIP the prompt students (PromptKD, KDPL) start from: same keys as `teacher`,
    a smaller and weaker embedded default; on the real path an open_clip model + pretrained tag."""
    embed_dim: int = 32
    vision_width: int = 16
    text_layers: int = 1
    epochs: int = 10


@dataclass(frozen=True)
class GeneratorParams:
    source: str = "embedded"
    taming_config: str = ""
    taming_checkpoint: str = ""
    embed_dim: int = 32
    n_embed: int = 256
    ch: int = 32
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2])
    num_res_blocks: int = 0        # taming's blocks use num_res_blocks + 1 per level
    steps: int = 4800
    batch_size: int = 64
    lr: float = 2e-3
    checkpoint_every: int = 500    # steps between resumable training-state saves (0 = only at the end)


@dataclass(frozen=True)
class MixPromptParams:
    styles_file: str = ""          # empty = the shipped clipdistill/assets/styles.txt
    k: int = 2                     # styles mixed per prompt
    dirichlet_alpha: float = 1.0   # k = 2, alpha = 1: weight lambda ~ U(0, 1)


@dataclass(frozen=True)
class RandomPromptParams:
    scale: float = 1.0             # multiplies the fitted per-dimension std
    fit_words: str = ""            # fit to these words' token rows (a word-list file); empty = every row


@dataclass(frozen=True)
class ContrastivePromptParams:
    steps: int = 60                # Adam steps per batch of prompts
    lr: float = 0.001              # token embeddings have std ~0.02: larger steps leave their range
    temperature: float = 0.1
    bank_size: int = 256           # FIFO memory bank of earlier prompts' features (0 = none)
    content_weight: float = 2.0    # weight of 1 - cos(prompt, class content) against InfoNCE
    batch_size: int = 64
    content_template: str = "{}"   # the class content prompt the styled prompt must stay near


@dataclass(frozen=True)
class PromptsParams:
    method: str = "vanilla"
    per_class: int = 100
    template: str = "a photo of a {}"
    style_template: str = "a {style} style of a {class}"
    mix: MixPromptParams = field(default_factory=MixPromptParams)
    random: RandomPromptParams = field(default_factory=RandomPromptParams)
    contrastive: ContrastivePromptParams = field(default_factory=ContrastivePromptParams)


@dataclass(frozen=True)
class SynthesizeParams:
    batch_size: int = 64
    shard_size: int = 128
    steps: int = 30
    lr: float = 0.1
    cutn: int = 4
    cut_pow: float = 1.0
    min_cut: float = 0.5
    augment: bool = True


@dataclass(frozen=True)
class TextFeaturesParams:
    templates: list[str] = field(default_factory=lambda: [f"a {domain} of a {{}}." for domain in (
        "photo", "painting", "cartoon", "sketch", "drawing", "picture")])


@dataclass(frozen=True)
class DistillParams:
    student: str = "cnn"
    backbone: str = "cifar_resnet"  # cnn student: cifar_resnet (width, depth) | resnet18 (torchvision, 224 px)
    head: str = "projection"
    loss: str = "kl"
    depth: int = 2
    width: int = 32
    temperature: float = 4.0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"       # adamw | sgd (momentum 0.9: CoOp's, KDPL's and PromptKD's optimiser)
    augment: bool = True
    images: str = "synthetic"      # synthetic | world (the world's train images, labels discarded) | a folder
    base_to_novel: bool = True     # also train on the first half of the classes; evaluate base/novel/HM
    checkpoint_every: int = 100    # steps between resumable training-state saves (0 = only at the end)
    # prompt students (PromptKD, KDPL)
    n_prompts: int = 4             # visual prompt tokens per layer (conv tower: side of a prompt map)
    prompt_depth: int = 4          # layers with visual prompts
    n_ctx: int = 4                 # KDPL: CoOp context tokens
    ctx_init: str = "a photo of a"
    visual_prompts: int = 0        # KDPL: visual prompts too (0 = text context only)
    kd_weight: float = 1000.0      # loss `promptkd`: PromptKD's weight
    class_agnostic: bool = False   # KDPL-CA: class names from the dictionary, top-K per batch
    topk: int = 1000
    classnames_file: str = ""      # empty = clipdistill/assets/classnames.txt


@dataclass(frozen=True)
class EvalDataset:
    name: str
    path: str


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = 256
    speed_batch: int = 64          # batch of the images/s measurement (speed.json)
    datasets: list[EvalDataset] = field(default_factory=list)


@dataclass(frozen=True)
class Params:
    world: WorldParams
    teacher: TeacherParams
    generator: GeneratorParams
    prompts: PromptsParams
    synthesize: SynthesizeParams
    text_features: TextFeaturesParams
    distill: DistillParams
    eval: EvalParams
    student_clip: StudentClipParams = field(default_factory=StudentClipParams)
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    threads: int = 2


# Allowed values of the keys that pick among implementations; the registries live next to the code.
CHOICES = {
    "device": ("cpu", "cuda", "auto"),
    "precision": ("auto", "fp32", "bf16"),
    "world.source": ("embedded", "folder"),
    "distill.backbone": ("cifar_resnet", "resnet18"),
    "teacher.source": ("embedded", "open_clip"),
    "teacher.vision": ("convnet", "vit"),
    "generator.source": ("embedded", "taming"),
    "prompts.method": ("vanilla", "mix", "random", "contrastive"),
    "student_clip.source": ("embedded", "open_clip"),
    "student_clip.vision": ("convnet", "vit"),
    "distill.student": ("cnn", "promptkd", "kdpl"),
    "distill.head": ("projection", "linear"),
    "distill.loss": ("kl", "reverse_kl", "symmetric_kl", "promptkd"),
    "distill.optimizer": ("adamw", "sgd"),
}
POSITIVE = {
    "world.image_size", "world.train_per_class_style", "world.test_per_class_domain",
    "teacher.embed_dim", "teacher.epochs", "teacher.batch_size", "teacher.context_length",
    "generator.steps", "generator.batch_size", "generator.n_embed", "generator.embed_dim",
    "prompts.per_class", "prompts.mix.k", "prompts.mix.dirichlet_alpha", "prompts.random.scale",
    "prompts.contrastive.steps", "prompts.contrastive.lr", "prompts.contrastive.temperature",
    "prompts.contrastive.batch_size", "synthesize.batch_size", "synthesize.shard_size", "synthesize.steps",
    "synthesize.cutn", "distill.epochs", "distill.batch_size", "distill.width", "distill.depth",
    "distill.temperature", "eval.batch_size", "eval.speed_batch", "distill.topk", "distill.kd_weight", "distill.n_ctx",
    "student_clip.embed_dim", "student_clip.epochs", "student_clip.batch_size", "student_clip.context_length",
}
# Sizes of the embedded CLIPs' towers (teacher, student_clip), all > 0.
_CLIP_SIZES = ("embed_dim", "vision_width", "vision_layers", "vision_heads", "patch_size", "text_width",
               "text_layers", "text_heads", "context_length", "epochs", "batch_size", "lr")
POSITIVE |= {f"{section}.{key}" for section in ("teacher", "student_clip") for key in _CLIP_SIZES}
# Learning rates and other step sizes: a zero or negative one trains nothing or climbs the loss.
POSITIVE |= {"generator.lr", "generator.ch", "synthesize.lr", "distill.lr"}
NON_NEGATIVE = {"teacher.checkpoint_every", "student_clip.checkpoint_every", "generator.checkpoint_every",
                "distill.checkpoint_every", "prompts.contrastive.bank_size", "prompts.contrastive.content_weight", "distill.n_prompts",
                "distill.prompt_depth", "distill.visual_prompts", "seed", "threads", "teacher.weight_decay",
                "student_clip.weight_decay", "distill.weight_decay", "generator.num_res_blocks", "synthesize.cut_pow"}
NON_EMPTY = {"world.classes", "world.eval_domains", "world.train_styles", "text_features.templates",
             "generator.ch_mult"}
# Keys whose entries become folder names (<root>/<domain>/<class>/, artifacts/world/<split>/<style>/<class>/).
FOLDER_NAMES = ("world.classes", "world.eval_domains", "world.train_styles")
_GROUPNORM_GROUPS = 32  # taming's blocks normalise with GroupNorm(32): every VQGAN width is a multiple of it
_CONV_TOWER_POOLS = 4   # the embedded ConvImageTower halves the image 4 times


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; returns the typed value or raises ParamsError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ParamsError(f"params key '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ParamsError(f"params key '{key}' must be a string, got {value!r}")
        return value
    raise ParamsError(f"params key '{key}' has an unsupported type {_type_name(tp)}")


def _build(cls, raw, prefix: str):
    where = prefix or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(f"params section '{where}' must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else key
            raise ParamsError(f"unknown params key '{full}' (known in '{where}': {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], full)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"missing params key '{full}'")
    return cls(**values)


def _check_values(p: Params) -> None:
    def get(key):
        obj = p
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    for key, allowed in CHOICES.items():
        if get(key) not in allowed:
            raise ParamsError(f"params key '{key}' is {get(key)!r}; choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if get(key) <= 0:
            raise ParamsError(f"params key '{key}' must be > 0, got {get(key)!r}")
    for key in NON_NEGATIVE:
        if get(key) < 0:
            raise ParamsError(f"params key '{key}' must be >= 0, got {get(key)!r}")
    for key in NON_EMPTY:
        if not get(key):
            raise ParamsError(f"params key '{key}' is empty; list at least one entry")
    for i, m in enumerate(p.generator.ch_mult):
        if m <= 0:
            raise ParamsError(f"params key 'generator.ch_mult[{i}]' must be > 0, got {m!r}")
    for key in FOLDER_NAMES:
        _check_folder_names(key, get(key))
    if p.world.source == "folder":
        _check_folder_world(p)
    else:
        _check_embedded_world(p)
    _check_architectures(p)
    missing = [d for d in p.world.eval_domains if d not in p.world.train_styles]
    if p.world.source == "embedded" and p.teacher.source == "embedded" and missing:
        raise ParamsError(f"params key 'world.train_styles' lacks evaluated domain(s) {', '.join(missing)}")
    for key in ("prompts.template", "prompts.contrastive.content_template"):
        if "{}" not in get(key):
            raise ParamsError(f"params key '{key}' must contain '{{}}' where the class name goes")
    for slot in ("{style}", "{class}"):
        if p.prompts.style_template.count(slot) != 1:
            raise ParamsError(f"params key 'prompts.style_template' must contain {slot} exactly once")
    for i, t in enumerate(p.text_features.templates):
        if "{}" not in t:
            raise ParamsError(f"params key 'text_features.templates[{i}]' must contain '{{}}'")
    if not 0 < p.synthesize.min_cut <= 1:
        raise ParamsError(f"params key 'synthesize.min_cut' must be in (0, 1], got {p.synthesize.min_cut}")
    names = [d.name for d in p.eval.datasets]
    if len(set(names)) != len(names) or "world" in names:
        raise ParamsError("params key 'eval.datasets' needs unique names other than 'world'")
    if p.teacher.source == "open_clip" and not p.teacher.pretrained:
        raise ParamsError("params key 'teacher.pretrained' must name an open_clip tag or checkpoint path "
                          "when teacher.source is open_clip")
    if p.student_clip.source == "open_clip" and not p.student_clip.pretrained:
        raise ParamsError("params key 'student_clip.pretrained' must name an open_clip tag or checkpoint path "
                          "when student_clip.source is open_clip")
    if p.distill.class_agnostic and p.distill.student != "kdpl":
        raise ParamsError("params key 'distill.class_agnostic' needs distill.student: kdpl")
    if p.distill.student == "cnn" and p.distill.head == "linear" and p.distill.base_to_novel:
        raise ParamsError("params key 'distill.base_to_novel' needs distill.head: projection (a linear head "
                          "cannot score classes it was not trained on)")
    if p.generator.source == "taming" and not (p.generator.taming_config and p.generator.taming_checkpoint):
        raise ParamsError("params keys 'generator.taming_config' and 'generator.taming_checkpoint' are "
                          "required when generator.source is taming")


def _check_folder_names(key: str, items: list[str]) -> None:
    """Each entry is a folder name: non-empty, no path separator, not '.' or '..', listed once."""
    seen = set()
    for i, name in enumerate(items):
        if not name.strip():
            raise ParamsError(f"params key '{key}[{i}]' is empty; each entry names a folder")
        bad = next((c for c in ("/", "\\", "\0") if c in name), None)
        if bad is not None or name in (".", ".."):
            what = f"contains {bad!r}" if bad is not None else "is not a folder name"
            raise ParamsError(f"params key '{key}[{i}]' {name!r} {what}; each entry becomes a folder name")
        if name in seen:
            raise ParamsError(f"params key '{key}' lists {name!r} more than once")
        seen.add(name)


def _check_embedded_world(p: Params) -> None:
    """world.source embedded: the procedural world renders only its own classes and styles, and the
    stages that train on it need batches no larger than the images it holds."""
    from .world import CLASSES, STYLES

    w = p.world
    unknown = [c for c in w.classes if c not in CLASSES]
    if unknown:
        raise ParamsError(f"params key 'world.classes' has {unknown[0]!r}, which the embedded world cannot render "
                          f"(renderable: {', '.join(CLASSES)}); for other classes use world.source folder")
    for key in ("world.train_styles", "world.eval_domains"):
        unknown = [s for s in getattr(w, key.split(".")[1]) if s not in STYLES]
        if unknown:
            raise ParamsError(f"params key '{key}' has {unknown[0]!r}, which the embedded world cannot render "
                              f"(styles: {', '.join(STYLES)})")
    if w.image_size < 8:
        raise ParamsError(f"params key 'world.image_size' is {w.image_size}; the embedded world renders at least 8 px")
    n_classes = len(w.classes)
    captioned = len(w.train_styles) * w.train_per_class_style * n_classes
    for key in ("teacher", "student_clip"):
        section = getattr(p, key)
        if section.source == "embedded" and section.batch_size > captioned:
            raise ParamsError(f"params key '{key}.batch_size' is {section.batch_size}, more than the {captioned} "
                              f"captioned train images (world.train_styles x world.train_per_class_style x "
                              f"world.classes)")
    d = p.distill
    if d.images not in ("synthetic", "world"):
        return  # a folder of unlabeled images: counted when the distill stage reads it
    if d.images == "synthetic":
        per_class, what = p.prompts.per_class, "synthesized images (prompts.per_class x world.classes)"
    else:
        per_class = len(w.train_styles) * w.train_per_class_style
        what = "world train images (world.train_styles x world.train_per_class_style x world.classes)"
    if d.batch_size > per_class * n_classes:
        raise ParamsError(f"params key 'distill.batch_size' is {d.batch_size}, more than the "
                          f"{per_class * n_classes} {what}")
    n_base = n_classes // 2
    if d.base_to_novel and n_base and d.batch_size > per_class * n_base:
        raise ParamsError(f"params key 'distill.batch_size' is {d.batch_size}, more than the {per_class * n_base} "
                          f"images of the {n_base} base class{'es' if n_base > 1 else ''} that "
                          f"distill.base_to_novel trains on")


def _check_architectures(p: Params) -> None:
    """What the embedded CLIPs and VQGAN can be built from, before a stage builds them."""
    size = p.world.image_size
    for key in ("teacher", "student_clip"):
        c = getattr(p, key)
        if c.source != "embedded":
            continue
        if c.text_width % c.text_heads:
            raise ParamsError(f"params key '{key}.text_width' ({c.text_width}) must be a multiple of "
                              f"{key}.text_heads ({c.text_heads})")
        if c.vision == "vit" and c.vision_width % c.vision_heads:
            raise ParamsError(f"params key '{key}.vision_width' ({c.vision_width}) must be a multiple of "
                              f"{key}.vision_heads ({c.vision_heads})")
        if c.vision == "convnet" and size < 2 ** _CONV_TOWER_POOLS:
            raise ParamsError(f"params key 'world.image_size' is {size}; the embedded {key}'s conv tower "
                              f"(vision: convnet) needs at least {2 ** _CONV_TOWER_POOLS} px")
    g = p.generator
    if g.source != "embedded":
        return
    widths = [g.ch * m for m in g.ch_mult]
    if any(wd % _GROUPNORM_GROUPS for wd in [g.ch, *widths]):
        raise ParamsError(f"params keys 'generator.ch' ({g.ch}) x 'generator.ch_mult' ({g.ch_mult}) must all be "
                          f"multiples of {_GROUPNORM_GROUPS} (taming's blocks use GroupNorm({_GROUPNORM_GROUPS}))")
    factor = 2 ** (len(g.ch_mult) - 1)
    if size % factor:
        raise ParamsError(f"params key 'world.image_size' is {size}, not divisible by the VQGAN's downsampling "
                          f"factor {factor} (2 ** (len(generator.ch_mult) - 1))")


def _check_folder_world(p: Params) -> None:
    """world.source folder: a real dataset replaces the rendered world, so nothing may train on
    the world's captions (there are none) and the world's unlabeled train split does not exist."""
    if not p.world.root:
        raise ParamsError("params key 'world.root' must name the image folder (<root>/<domain>/<class>/*) "
                          "when world.source is folder")
    for key in ("teacher", "student_clip", "generator"):
        if getattr(p, key).source == "embedded" and (key != "student_clip" or p.distill.student != "cnn"):
            want = "taming" if key == "generator" else "open_clip"
            raise ParamsError(f"params key '{key}.source' is embedded, which trains on the rendered world; "
                              f"with world.source folder set it to {want}")
    if p.distill.images == "world":
        raise ParamsError("params key 'distill.images' is world, the rendered world's train split; with "
                          "world.source folder give synthetic or the path of an unlabeled image folder")


def parse_params(raw: dict) -> Params:
    """Validate a params mapping (as read from YAML) into `Params`; raises ParamsError."""
    params = _build(Params, raw if raw is not None else {}, "")
    _check_values(params)
    return params


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: `1e-4` (what `dvc exp run -S distill.lr=1e-4`
    writes) is a float, not the string PyYAML's YAML 1.1 rules make of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; a bad file fails with one line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    # Bytes, not text: PyYAML decodes them itself (UTF-8/16), and a bad byte is a YAMLError naming it.
    try:
        raw = yaml.load(path.read_bytes(), Loader=_Loader)
    except yaml.reader.ReaderError as exc:  # a byte that does not decode, or a character YAML forbids
        what = (f"character {exc.character:#04x} is not allowed" if exc.encoding == "unicode"
                else f"not {exc.encoding} text (byte {exc.character:#04x})")
        raise ParamsError(f"{path} is not valid YAML: {what} at position {exc.position}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path} is not valid YAML: {what}{where}") from None
    if raw is None:
        raise ParamsError(f"params file {path} is empty; it must map params keys (seed, world, ...) to values")
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {path} must be a mapping of params keys (seed, world, ...), "
                          f"got a {type(raw).__name__}")
    return parse_params(raw)
