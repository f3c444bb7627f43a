"""Reader for official taming-transformers VQGAN releases: ``model.yaml`` + Lightning ``last.ckpt`` -> a VQGAN.

The .ckpt is a pickle, so it goes through torch's weights-only unpickler with a short allowlist on top: tensors,
containers and numbers load, Lightning and numpy objects become inert placeholders, any other global is refused
before anything runs. Neither pytorch-lightning nor numpy is imported for it.
"""

from __future__ import annotations

import _compat_pickle
import collections
import os
import pickle
import pickletools
import re
from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor, _weights_only_unpickler

from clipdistill.vqgan import (
    _QUANTIZER_FIELDS,
    VQGAN,
    CheckpointError,
    MissingCheckpointError,
    VQGANConfig,
    _load_state,
    _one_line,
)

__all__ = ["load_taming_checkpoint", "read_lightning_checkpoint", "UnsafeGlobalError"]

# The releases listed in taming-transformers' README (link name -> table row) that this loader reads.
_TAMING_RELEASES = {
    "vqgan_imagenet_f16_1024": "VQGAN ImageNet (f=16), 1024",
    "vqgan_imagenet_f16_16384": "VQGAN ImageNet (f=16), 16384",
    "vqgan_gumbel_f8": "VQGAN OpenImages (f=8), 8192, GumbelQuantization",
}
# model.target of a release config -> VQGANConfig.quantizer
_TAMING_TARGETS = {"taming.models.vqgan.VQModel": "vq", "taming.models.vqgan.GumbelVQ": "gumbel"}
# Architecture-changing ddconfig keys this module does not implement, with the only value it supports.
_DDCONFIG_FIXED = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False}

# ------------------------------------------------------------------------------------------- the allowlist
# torch's weights-only unpickler already admits tensors, storages, dtypes, devices, OrderedDict, set, complex,
# bytearray and bytes (torch._weights_only_unpickler._get_allowed_globals()). It also restricts what the other
# opcodes may do (REDUCE only calls allowed globals, BUILD only on instances of allowed classes, SETITEMS only on
# plain dicts, persistent ids only name storages), which a pickle.Unpickler subclass cannot: its find_class sees
# names, not what is then called or set. On top of torch's set, a release pickle may need:

# Plain containers, for pickles written by other code than torch.save (pickle references these by name for
# subclasses, frozensets, slices and defaultdict factories). None of them runs code from its arguments.
_EXTRA_GLOBALS: dict[str, object] = {
    "collections.defaultdict": collections.defaultdict,
    "builtins.frozenset": frozenset,
    "builtins.tuple": tuple,
    "builtins.list": list,
    "builtins.dict": dict,
    "builtins.slice": slice,
}
# Lightning pickles callback classes (the ModelCheckpoint state is keyed by its class) and may pickle its own
# objects; any global from these packages becomes a placeholder, never imported.
_PLACEHOLDER_PACKAGES = frozenset({"pytorch_lightning", "lightning", "lightning_fabric"})
# numpy scalars and arrays in callback state (e.g. a monitored score). They become placeholders too, not numpy
# objects: numpy.dtype's __setstate__ takes its internal flags from the file (a float64 dtype can be made to
# claim it holds object pointers), so real numpy reconstruction is not memory-safe on a hostile file. Only the
# state_dict is used, so nothing is lost.
_NUMPY_PLACEHOLDERS = frozenset({
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
})
_NUMPY_DTYPE_CLASS = re.compile(r"numpy\.dtypes\.\w+DType")
_LEGACY_PICKLES = 5  # pickles at the start of a pre-1.6 (non-zip) torch.save file
# how torch's weights-only unpickler names a global it refuses (should a name get past the pre-scan)
_TORCH_REFUSAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


class UnsafeGlobalError(CheckpointError):
    """The checkpoint pickle refers to a global outside the allowlist; nothing was called."""


def load_taming_checkpoint(config_path: str | os.PathLike, ckpt_path: str | os.PathLike) -> VQGAN:
    """Load an official taming-transformers release: YAML config + Lightning .ckpt -> CPU VQGAN (eval mode).

    config_path: the release's ``model.yaml``; ``model.target`` must be ``taming.models.vqgan.VQModel``
    (quantizer "vq": VectorQuantizer / VectorQuantizer2 checkpoints, key ``quantize.embedding.weight``) or
    ``taming.models.vqgan.GumbelVQ`` (quantizer "gumbel": keys ``quantize.proj.*`` and ``quantize.embed.weight``).
    ``model.params.{embed_dim, n_embed, ddconfig}`` give the architecture (``kl_weight`` too for GumbelVQ);
    ``lossconfig``, ``temperature_scheduler_config``, ``monitor``, ``sane_index_shape`` and ``legacy`` only
    matter for training and are ignored, so nothing is built that would download LPIPS/VGG weights.
    ``remap`` must be null. Read with ``yaml.safe_load``.

    ckpt_path: the release's ``last.ckpt``, read by torch's weights-only unpickler with an allowlist on top, so a
    hostile file cannot run code. A global resolves only if torch's weights-only loader admits it (tensor and
    storage rebuilds, dtypes, devices, OrderedDict, set, ...) or it is a plain container (frozenset, tuple,
    list, dict, slice, defaultdict); globals of pytorch_lightning / lightning / lightning_fabric and numpy
    scalars/arrays (callback state) become inert placeholders without importing anything. Any other global
    (os.system, eval, subprocess, ...) is refused before it could be called. The ``state_dict`` (or a bare state
    dict) is loaded strictly after dropping the training-only ``loss.*`` keys (discriminator, LPIPS); everything
    else in the file is ignored.

    Raises FileNotFoundError naming a missing file and the release to download, ValueError (CheckpointError,
    one line, naming the file) for malformed configs, refused globals and unreadable or non-matching checkpoints,
    NotImplementedError for configs this module cannot represent.
    """
    config_path, ckpt_path = Path(config_path), Path(ckpt_path)
    for path, what in ((config_path, "config"), (ckpt_path, "checkpoint")):
        if not path.is_file():
            raise _missing_release_file(path, what)
    cfg = _taming_config(config_path)
    try:
        model = VQGAN(cfg)
    except ValueError as exc:
        raise CheckpointError(f"taming config {config_path}: unusable architecture: {_one_line(exc)}") from exc
    _load_state(model, _lightning_state_dict(ckpt_path), ckpt_path)
    return model.eval()


def _missing_release_file(path: Path, what: str) -> MissingCheckpointError:
    release = _guess_release(path)
    if release:
        source = f"the official taming-transformers release {release} (README row '{_TAMING_RELEASES[release]}')"
    else:
        source = f"an official taming-transformers release (one of {', '.join(_TAMING_RELEASES)})"
    name = "model.yaml" if what == "config" else "last.ckpt"
    return MissingCheckpointError(
        f"taming VQGAN {what} {path} does not exist: download {name} of {source} and save it as exactly this path"
    )


def _guess_release(path: Path) -> str | None:
    """Release name from a path like ``<release>.ckpt`` or ``<release>/configs/model.yaml``, if one matches."""
    for part in (path.stem, *(parent.name for parent in path.parents)):
        for name in _TAMING_RELEASES:
            # the Gumbel release is also kept as vqgan_gumbel_f8_8192.*
            if part == name or part.startswith(name + "_"):
                return name
    return None


def _taming_config(path: Path) -> VQGANConfig:
    """Parse a release ``model.yaml`` into a VQGANConfig (not yet validated: VQGAN() does that)."""
    import yaml  # local: only this loader needs it

    try:
        raw = yaml.safe_load(path.read_text())
        target = str(raw["model"]["target"])
        params = raw["model"]["params"]
        ddconfig = dict(params["ddconfig"])
        n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
        kl_weight = float(params.get("kl_weight", 1e-8))  # GumbelVQ's default
    except (yaml.YAMLError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(
            f"taming config {path} is not in the official layout "
            f"(model.target, model.params.{{embed_dim,n_embed,ddconfig}}): {_one_line(exc)}"
        ) from exc
    if target not in _TAMING_TARGETS:
        raise CheckpointError(
            f"taming config {path}: model.target {target} is not supported (supported: {', '.join(_TAMING_TARGETS)})"
        )
    if params.get("remap") is not None:
        raise CheckpointError(f"taming config {path}: codebook remapping ('remap') is not supported")
    for key, supported in _DDCONFIG_FIXED.items():
        if key in ddconfig and bool(ddconfig[key]) != supported:
            raise CheckpointError(f"taming config {path}: ddconfig {key}={ddconfig[key]} is not supported")
    known = {f.name for f in fields(VQGANConfig)} - set(_QUANTIZER_FIELDS)
    # taming's Encoder/Decoder swallow unknown kwargs too, so ignoring the rest matches its behaviour
    cfg_kwargs = {k: v for k, v in ddconfig.items() if k in known}
    try:
        return VQGANConfig(
            embed_dim=embed_dim, n_embed=n_embed, quantizer=_TAMING_TARGETS[target], kl_weight=kl_weight, **cfg_kwargs
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"taming config {path}: unusable ddconfig: {_one_line(exc)}") from exc


def _lightning_state_dict(path: Path) -> dict[str, Tensor]:
    """The model weights of a Lightning .ckpt (or of a bare pickled state dict), without ``loss.*`` keys."""
    ckpt = read_lightning_checkpoint(path)
    state = None
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and all(isinstance(v, Tensor) for v in ckpt.values()):
        state = ckpt  # a bare state dict
    if not isinstance(state, dict) or not state:
        found = sorted(map(str, ckpt))[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"taming checkpoint {path} holds no state_dict (found {found})")
    return {k: v for k, v in state.items() if not str(k).startswith("loss.")}


def read_lightning_checkpoint(path: str | os.PathLike):
    """Unpickle a Lightning .ckpt on CPU through the allowlist (see load_taming_checkpoint); returns its object.

    Raises UnsafeGlobalError (a CheckpointError) naming the first refused global, CheckpointError if unreadable.
    """
    path = Path(path)
    # Every global is checked before anything is unpickled, so a refusal names the global and nothing has run.
    extra = _allowed_extras(path, _checkpoint_globals(path))
    try:
        # weights_only=True: torch's restricted unpickler, whose REDUCE/BUILD rules hold for our extras too; an
        # explicit True also cannot be overridden by TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # the pre-scan lists every GLOBAL, so this is a safety net; torch's own refusal holds regardless
        refused = _TORCH_REFUSAL.search(str(exc))
        if refused:
            raise _unsafe(path, refused.group(1)) from None
        raise CheckpointError(f"taming checkpoint {path} is unreadable or corrupt: {_one_line(exc)[:300]}") from exc
    except Exception as exc:  # zip and torch errors alike: whatever it is, the file is unusable
        raise CheckpointError(f"taming checkpoint {path} is unreadable or corrupt: {_one_line(exc)[:300]}") from exc


def _checkpoint_globals(path: Path) -> list[str]:
    """Names ("module.name") of the globals in a checkpoint's pickles that torch does not admit by itself.

    A static pass (nothing imported or called) over the GLOBAL opcodes, the only way torch's weights-only
    unpickler resolves names; what it cannot parse that unpickler refuses too.
    """
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError:  # "Expected input to be a checkpoint returned by torch.save": not a zip, try the old format
        pass
    except Exception as exc:
        raise CheckpointError(f"taming checkpoint {path} is unreadable or corrupt: {_one_line(exc)[:300]}") from exc
    try:
        return sorted(_legacy_globals(path) - set(_weights_only_unpickler._get_allowed_globals()))
    except Exception as exc:  # not a pickle either
        raise CheckpointError(f"taming checkpoint {path} is unreadable or corrupt: {_one_line(exc)[:300]}") from exc


def _legacy_globals(path: Path) -> set[str]:
    """GLOBAL names in a pre-1.6 (non-zip) torch.save file: consecutive pickles, then raw storage bytes."""
    names = set()
    with path.open("rb") as fh:
        # magic number, protocol version, sys info, the object, its storage keys: torch.load unpickles all five
        for _ in range(_LEGACY_PICKLES):
            for op, arg, _pos in pickletools.genops(fh):
                if op.name == "GLOBAL":
                    names.add(".".join(_python3_name(*arg.split(" ", 1))))
    return names


def _python3_name(module: str, name: str) -> tuple[str, str]:
    """A protocol-2 GLOBAL's names as torch's unpickler reads them (``__builtin__.set`` -> ``builtins.set``)."""
    if (module, name) in torch._utils.NAME_MAPPING:
        return torch._utils.NAME_MAPPING[(module, name)]
    return torch._utils.IMPORT_MAPPING.get(module, module), name


def _shown_name(name: str) -> str:
    """``name``, plus what a plain unpickler would import for it when that differs (``commands.Popen``)."""
    module, _, attr = name.rpartition(".")
    py3 = _compat_pickle.NAME_MAPPING.get((module, attr)) or (_compat_pickle.IMPORT_MAPPING.get(module, module), attr)
    py3_name = ".".join(py3)
    return name if py3_name == name else f"{name} (that is {py3_name})"


def _allowed_extras(path: Path, names: list[str]) -> list[tuple[object, str]]:
    """(object, name) pairs for torch.serialization.safe_globals; raises UnsafeGlobalError for a name not allowed."""
    return [(_resolve_global(path, name), name) for name in names]


def _resolve_global(path: Path, name: str) -> object:
    """What ``name`` stands for in a release pickle: a plain container, a new placeholder class, or a refusal."""
    if name in _EXTRA_GLOBALS:
        return _EXTRA_GLOBALS[name]
    if _is_placeholder_name(name):
        module, _, attr = name.rpartition(".")
        # made here, never imported: the name is all it shares with the real thing
        return type(attr, (_Placeholder,), {"__module__": module, "__qualname__": attr})
    raise _unsafe(path, name)


def _is_placeholder_name(name: str) -> bool:
    return (
        name.split(".")[0] in _PLACEHOLDER_PACKAGES
        or name in _NUMPY_PLACEHOLDERS
        or _NUMPY_DTYPE_CLASS.fullmatch(name) is not None
    )


def _unsafe(path: Path, name: str) -> UnsafeGlobalError:
    return UnsafeGlobalError(
        f"taming checkpoint {path} refers to {_shown_name(name)}, which a weights file never needs; refusing to load "
        "it (only tensors, containers, numbers and Lightning callback state are read)"
    )


class _Placeholder(dict):
    """Stands in for a pickled Lightning or numpy object; ignores whatever it is called or built with.

    An (always empty) dict, so code that walks callback state as mappings still can. Only the state_dict of a
    checkpoint is used, so whatever these held is dropped.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def __setstate__(self, state) -> None:
        pass
