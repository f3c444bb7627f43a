"""The one config source: `params.yaml` parsed into typed dataclasses and validated.

Every stage calls `load_params()` first, so an unknown key, a wrong type or an empty class list
fails at stage start with one line naming the key, before anything is written. The dataclasses
hold types only: every key is written out in each params file (params.yaml, presets/, the tests'
tiny file), so params.yaml is the one place a default lives and DVC tracks every key a stage reads.
A stage unpacks its section into explicit keyword arguments, so grepping a key's leaf name finds
its use in one hop.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .runtime import PipelineError


class ParamsError(PipelineError, ValueError):
    """A params.yaml problem; the message is one line naming the key."""


@dataclass(frozen=True)
class DataParams:
    workers: int
    memory_budget_mb: float


@dataclass(frozen=True)
class WorldParams:
    source: str
    root: str
    classes: list[str]
    image_size: int
    eval_domains: list[str]
    train_styles: list[str]
    train_per_class_style: int
    test_per_class_domain: int
    val_styles: list[str]
    val_per_class_style: int


@dataclass(frozen=True)
class ClipParams:
    """`teacher` and `student_clip`: the same keys, each section written out in full in params.yaml."""
    source: str
    open_clip_model: str
    pretrained: str
    vision: str
    embed_dim: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    patch_size: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    checkpoint_every: int


@dataclass(frozen=True)
class GeneratorParams:
    source: str
    taming_config: str
    taming_checkpoint: str
    embed_dim: int
    n_embed: int
    ch: int
    ch_mult: list[int]
    num_res_blocks: int
    steps: int
    batch_size: int
    lr: float
    schedule: str
    checkpoint_every: int


@dataclass(frozen=True)
class MixPromptParams:
    styles_file: str
    k: int
    dirichlet_alpha: float


@dataclass(frozen=True)
class RandomPromptParams:
    scale: float
    fit_words: str


@dataclass(frozen=True)
class ContrastivePromptParams:
    steps: int
    lr: float
    temperature: float
    bank_size: int
    content_weight: float
    batch_size: int
    content_template: str


@dataclass(frozen=True)
class PromptsParams:
    method: str
    per_class: int
    template: str
    style_template: str
    mix: MixPromptParams
    random: RandomPromptParams
    contrastive: ContrastivePromptParams


@dataclass(frozen=True)
class SynthesizeParams:
    batch_size: int
    shard_size: int
    steps: int
    lr: float
    cutn: int
    cut_pow: float
    min_cut: float
    augment: bool


@dataclass(frozen=True)
class TextFeaturesParams:
    templates: list[str]


@dataclass(frozen=True)
class CnnStudentParams:
    backbone: str
    head: str
    depth: int
    width: int


@dataclass(frozen=True)
class PromptKDStudentParams:
    n_prompts: int
    prompt_depth: int


@dataclass(frozen=True)
class KDPLStudentParams:
    n_ctx: int
    ctx_init: str
    n_prompts: int
    prompt_depth: int
    class_agnostic: bool
    topk: int
    classnames_file: str


@dataclass(frozen=True)
class DistillParams:
    student: str
    images: str
    base_to_novel: bool
    checkpoint_every: int
    loss: str
    kd_weight: float
    feature_kl_weight: float
    temperature: float
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    augment: bool
    holdout_images: int
    cnn: CnnStudentParams
    promptkd: PromptKDStudentParams
    kdpl: KDPLStudentParams


@dataclass(frozen=True)
class EvalDataset:
    name: str
    path: str


@dataclass(frozen=True)
class EvalParams:
    batch_size: int
    speed_batch: int
    datasets: list[EvalDataset]


@dataclass(frozen=True)
class ExportParams:
    parity_images: int


@dataclass(frozen=True)
class Params:
    seed: int
    device: str
    precision: str
    threads: int
    data: DataParams
    world: WorldParams
    teacher: ClipParams
    generator: GeneratorParams
    prompts: PromptsParams
    synthesize: SynthesizeParams
    text_features: TextFeaturesParams
    student_clip: ClipParams
    distill: DistillParams
    eval: EvalParams
    export: ExportParams


# Keys that pick among implementations: the allowed values are the names of the registry that
# implements them (module, table), read at validation. Only the names are read, so these modules
# are not deps of every stage in dvc.yaml (tests/test_dvc_deps.py follows code, not name lookups).
REGISTRIES = {
    "device": ("clipdistill.runtime", "DEVICES"),
    "precision": ("clipdistill.runtime", "PRECISIONS"),
    "world.source": ("clipdistill.world", "SOURCES"),
    "teacher.source": ("clipdistill.clip_models", "CLIP_SOURCES"),
    "teacher.vision": ("clipdistill.clip_models", "IMAGE_TOWERS"),
    "student_clip.source": ("clipdistill.clip_models", "CLIP_SOURCES"),
    "student_clip.vision": ("clipdistill.clip_models", "IMAGE_TOWERS"),
    "generator.source": ("clipdistill.vqgan", "SOURCES"),
    "generator.schedule": ("clipdistill.vqgan", "SCHEDULES"),
    "prompts.method": ("clipdistill.prompts", "METHODS"),
    "distill.student": ("clipdistill.students", "STUDENTS"),
    "distill.loss": ("clipdistill.losses", "LOSSES"),
    "distill.optimizer": ("clipdistill.training", "OPTIMIZERS"),
    "distill.cnn.backbone": ("clipdistill.students", "BACKBONES"),
    "distill.cnn.head": ("clipdistill.students", "HEADS"),
}


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of `key`: the names in its registry."""
    return _names(*REGISTRIES[key])


def _names(module: str, table: str) -> tuple[str, ...]:
    """The keys of registry `table` in `module`, imported only when asked (params.py stays
    importable without torch-heavy modules, and they are not its dependencies)."""
    import importlib

    return tuple(getattr(importlib.import_module(module), table))


def _check_val_styles(params) -> None:
    """world.val_styles: the validation split that choices are made on, never the evaluated domains."""
    if params.world.source == "folder":
        return  # a folder world has no rendered validation split; the key is not read
    val = params.world.val_styles
    clash = [s for s in val if s in params.world.eval_domains]
    if clash:
        raise ParamsError(f"params key 'world.val_styles' has {clash[0]!r}, an evaluated domain: validation "
                          f"must not be scored on the domains it is tested on")
    untrained = [s for s in val if s not in params.world.train_styles]
    if untrained:
        raise ParamsError(f"params key 'world.val_styles' has {untrained[0]!r}, which is not in world.train_styles: "
                          f"validate on styles the teacher was trained on")
    if len(set(val)) != len(val):
        raise ParamsError("params key 'world.val_styles' lists a style twice")


POSITIVE = {
    "world.image_size", "world.train_per_class_style", "world.test_per_class_domain", "world.val_per_class_style",
    "generator.steps", "generator.batch_size", "generator.n_embed", "generator.embed_dim",
    "prompts.per_class", "prompts.mix.k", "prompts.mix.dirichlet_alpha", "prompts.random.scale",
    "prompts.contrastive.steps", "prompts.contrastive.lr", "prompts.contrastive.temperature",
    "prompts.contrastive.batch_size", "synthesize.batch_size", "synthesize.shard_size", "synthesize.steps",
    "synthesize.cutn", "distill.epochs", "distill.batch_size", "distill.cnn.width", "distill.cnn.depth",
    "distill.temperature", "eval.batch_size", "eval.speed_batch", "distill.kdpl.topk", "distill.kd_weight",
    "distill.kdpl.n_ctx", "export.parity_images",
}
# Sizes of the embedded CLIPs' towers (teacher, student_clip), all > 0.
_CLIP_SIZES = ("embed_dim", "vision_width", "vision_layers", "vision_heads", "patch_size", "text_width",
               "text_layers", "text_heads", "context_length", "epochs", "batch_size", "lr")
POSITIVE |= {f"{section}.{key}" for section in ("teacher", "student_clip") for key in _CLIP_SIZES}
# Learning rates and other step sizes: a zero or negative one trains nothing or climbs the loss.
POSITIVE |= {"generator.lr", "generator.ch", "synthesize.lr", "distill.lr"}
NON_NEGATIVE = {"teacher.checkpoint_every", "student_clip.checkpoint_every", "generator.checkpoint_every",
                "distill.checkpoint_every", "distill.holdout_images", "distill.feature_kl_weight", "prompts.contrastive.bank_size", "prompts.contrastive.content_weight",
                "distill.promptkd.n_prompts", "distill.promptkd.prompt_depth", "distill.kdpl.n_prompts",
                "distill.kdpl.prompt_depth", "seed", "threads",
                "data.workers", "data.memory_budget_mb", "teacher.weight_decay",
                "student_clip.weight_decay", "distill.weight_decay", "generator.num_res_blocks", "synthesize.cut_pow"}
NON_EMPTY = {"world.classes", "world.eval_domains", "world.train_styles", "text_features.templates",
             "generator.ch_mult"}
# Keys whose entries become folder names (<root>/<domain>/<class>/, artifacts/world/<split>/<style>/<class>/).
FOLDER_NAMES = ("world.classes", "world.eval_domains", "world.train_styles", "world.val_styles")
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
        else:  # every key is written out in the params file: no default hides from DVC's params tracking
            raise ParamsError(f"missing params key '{full}'")
    return cls(**values)


def _check_values(params: Params) -> None:
    def get(key):
        obj = params
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    for key in REGISTRIES:
        allowed = choices(key)
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
    for i, m in enumerate(params.generator.ch_mult):
        if m <= 0:
            raise ParamsError(f"params key 'generator.ch_mult[{i}]' must be > 0, got {m!r}")
    for key in FOLDER_NAMES:
        _check_folder_names(key, get(key))
    if params.world.source == "folder":
        _check_folder_world(params)
    else:
        _check_embedded_world(params)
    _check_architectures(params)
    _check_val_styles(params)
    missing = [d for d in params.world.eval_domains if d not in params.world.train_styles]
    if params.world.source == "embedded" and params.teacher.source == "embedded" and missing:
        raise ParamsError(f"params key 'world.train_styles' lacks evaluated domain(s) {', '.join(missing)}")
    for key in ("prompts.template", "prompts.contrastive.content_template"):
        if "{}" not in get(key):
            raise ParamsError(f"params key '{key}' must contain '{{}}' where the class name goes")
    for slot in ("{style}", "{class}"):
        if params.prompts.style_template.count(slot) != 1:
            raise ParamsError(f"params key 'prompts.style_template' must contain {slot} exactly once")
    for i, t in enumerate(params.text_features.templates):
        if "{}" not in t:
            raise ParamsError(f"params key 'text_features.templates[{i}]' must contain '{{}}'")
    if not 0 < params.synthesize.min_cut <= 1:
        raise ParamsError(f"params key 'synthesize.min_cut' must be in (0, 1], got {params.synthesize.min_cut}")
    names = [dataset.name for dataset in params.eval.datasets]
    if len(set(names)) != len(names) or "world" in names:
        raise ParamsError("params key 'eval.datasets' needs unique names other than 'world'")
    if params.teacher.source == "open_clip" and not params.teacher.pretrained:
        raise ParamsError("params key 'teacher.pretrained' must name an open_clip tag or checkpoint path "
                          "when teacher.source is open_clip")
    if params.student_clip.source == "open_clip" and not params.student_clip.pretrained:
        raise ParamsError("params key 'student_clip.pretrained' must name an open_clip tag or checkpoint path "
                          "when student_clip.source is open_clip")
    if params.distill.loss in _names("clipdistill.losses", "FEATURE_DISTANCES") and not (
            params.distill.student == "promptkd" or params.distill.student == "cnn" and params.distill.cnn.head == "projection"):
        raise ParamsError(f"params key 'distill.loss' {params.distill.loss} needs a student with image features: "
                          "distill.student promptkd, or cnn with distill.cnn.head projection")
    if params.distill.kdpl.class_agnostic and params.distill.student != "kdpl":
        raise ParamsError("params key 'distill.kdpl.class_agnostic' needs distill.student: kdpl")
    if params.distill.student == "cnn" and params.distill.cnn.head == "linear" and params.distill.base_to_novel:
        raise ParamsError("params key 'distill.base_to_novel' needs distill.cnn.head: projection (a linear head "
                          "cannot score classes it was not trained on)")
    if params.generator.source == "taming" and not (params.generator.taming_config and params.generator.taming_checkpoint):
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


def _check_embedded_world(params: Params) -> None:
    """world.source embedded: the procedural world renders only its own classes and styles, and the
    stages that train on it need batches no larger than the images it holds."""
    from .world import CLASSES, STYLES

    unknown = [c for c in params.world.classes if c not in CLASSES]
    if unknown:
        raise ParamsError(f"params key 'world.classes' has {unknown[0]!r}, which the embedded world cannot render "
                          f"(renderable: {', '.join(CLASSES)}); for other classes use world.source folder")
    for key in ("world.train_styles", "world.eval_domains"):
        unknown = [s for s in getattr(params.world, key.split(".")[1]) if s not in STYLES]
        if unknown:
            raise ParamsError(f"params key '{key}' has {unknown[0]!r}, which the embedded world cannot render "
                              f"(styles: {', '.join(STYLES)})")
    if params.world.image_size < 8:
        raise ParamsError(f"params key 'world.image_size' is {params.world.image_size}; the embedded world renders at least 8 px")
    n_classes = len(params.world.classes)
    captioned = len(params.world.train_styles) * params.world.train_per_class_style * n_classes
    for key in ("teacher", "student_clip"):
        section = getattr(params, key)
        if section.source == "embedded" and section.batch_size > captioned:
            raise ParamsError(f"params key '{key}.batch_size' is {section.batch_size}, more than the {captioned} "
                              f"captioned train images (world.train_styles x world.train_per_class_style x "
                              f"world.classes)")
    if params.distill.images not in ("synthetic", "world"):
        return  # a folder of unlabeled images: counted when the distill stage reads it
    if params.distill.images == "synthetic":
        per_class, what = params.prompts.per_class, "synthesized images (prompts.per_class x world.classes)"
    else:
        per_class = len(params.world.train_styles) * params.world.train_per_class_style
        what = "world train images (world.train_styles x world.train_per_class_style x world.classes)"
    if params.distill.batch_size > per_class * n_classes:
        raise ParamsError(f"params key 'distill.batch_size' is {params.distill.batch_size}, more than the "
                          f"{per_class * n_classes} {what}")
    n_base = n_classes // 2
    if params.distill.base_to_novel and n_base and params.distill.batch_size > per_class * n_base:
        raise ParamsError(f"params key 'distill.batch_size' is {params.distill.batch_size}, more than the {per_class * n_base} "
                          f"images of the {n_base} base class{'es' if n_base > 1 else ''} that "
                          f"distill.base_to_novel trains on")


def _check_architectures(params: Params) -> None:
    """What the embedded CLIPs and VQGAN can be built from, before a stage builds them."""
    size = params.world.image_size
    for key in ("teacher", "student_clip"):
        c = getattr(params, key)
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
    if params.generator.source != "embedded":
        return
    widths = [params.generator.ch * m for m in params.generator.ch_mult]
    if any(wd % _GROUPNORM_GROUPS for wd in [params.generator.ch, *widths]):
        raise ParamsError(f"params keys 'generator.ch' ({params.generator.ch}) x 'generator.ch_mult' ({params.generator.ch_mult}) must all be "
                          f"multiples of {_GROUPNORM_GROUPS} (taming's blocks use GroupNorm({_GROUPNORM_GROUPS}))")
    if params.generator.num_res_blocks == 0 and any(m != 1 for m in params.generator.ch_mult[:-1]):
        # taming's Encoder widens a level only inside its res blocks; with none, a widened level's
        # downsample gets the previous width and fails mid-training (GroupNorm shape error)
        raise ParamsError(f"params key 'generator.ch_mult' is {params.generator.ch_mult}: with 'generator.num_res_blocks' 0 "
                          f"every entry but the last must be 1 (taming's encoder widens only in res blocks)")
    factor = 2 ** (len(params.generator.ch_mult) - 1)
    if size % factor:
        raise ParamsError(f"params key 'world.image_size' is {size}, not divisible by the VQGAN's downsampling "
                          f"factor {factor} (2 ** (len(generator.ch_mult) - 1))")


def _check_folder_world(params: Params) -> None:
    """world.source folder: a real dataset replaces the rendered world, so nothing may train on
    the world's captions (there are none) and the world's unlabeled train split does not exist."""
    if not params.world.root:
        raise ParamsError("params key 'world.root' must name the image folder (<root>/<domain>/<class>/*) "
                          "when world.source is folder")
    for key in ("teacher", "student_clip", "generator"):
        if getattr(params, key).source == "embedded" and (key != "student_clip" or params.distill.student != "cnn"):
            want = "taming" if key == "generator" else "open_clip"
            raise ParamsError(f"params key '{key}.source' is embedded, which trains on the rendered world; "
                              f"with world.source folder set it to {want}")
    if params.distill.images == "world":
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
