"""Files in the layout of official taming-transformers VQGAN releases, for tests that cannot download them.

Configs reproduce the releases' ``model.yaml`` (model.target, model.params with lossconfig, ...). Weights come
from taming's own Encoder/Decoder/VectorQuantizer (the PyPI package) at the configs' shapes; GumbelQuantize is
not in that package, so its two tensors are built under the official names and shapes. Checkpoints are
Lightning-style pickles: an OrderedDict state_dict with ``loss.*`` keys, optimizer states, and callback state keyed
by a class that is pickled as pytorch-lightning's ModelCheckpoint, holding a tensor and a numpy scalar.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import sys
import types
from pathlib import Path

import numpy as np
import torch
import yaml
from taming.modules.diffusionmodules.model import Decoder, Encoder
from taming.modules.vqvae.quantize import VectorQuantizer
from torch import nn

_F16_DDCONFIG = {
    "double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0,
}
_VQLPIPS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"

# release name -> its model.yaml
RELEASE_CONFIGS = {
    "vqgan_imagenet_f16_1024": {"model": {
        "base_learning_rate": 4.5e-06,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": 256,
            "n_embed": 1024,
            "ddconfig": _F16_DDCONFIG,
            "lossconfig": {"target": _VQLPIPS, "params": {
                "disc_conditional": False, "disc_in_channels": 3, "disc_start": 250001, "disc_weight": 0.8,
                "codebook_weight": 1.0,
            }},
        },
    }},
    "vqgan_imagenet_f16_16384": {"model": {
        "base_learning_rate": 4.5e-06,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": 256,
            "n_embed": 16384,
            "monitor": "val/rec_loss",
            "ddconfig": _F16_DDCONFIG,
            "lossconfig": {"target": _VQLPIPS, "params": {
                "disc_conditional": False, "disc_in_channels": 3, "disc_start": 0, "disc_weight": 0.75,
                "disc_num_layers": 2, "codebook_weight": 1.0,
            }},
        },
    }},
    "vqgan_gumbel_f8": {"model": {
        "base_learning_rate": 4.5e-06,
        "target": "taming.models.vqgan.GumbelVQ",
        "params": {
            "kl_weight": 1.0e-08,
            "embed_dim": 256,
            "n_embed": 8192,
            "monitor": "val/rec_loss",
            "temperature_scheduler_config": {
                "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
                "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9, "lr_max": 0.9,
                           "lr_min": 1.0e-06},
            },
            "ddconfig": {**_F16_DDCONFIG, "ch_mult": [1, 1, 2, 4], "attn_resolutions": [32]},
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
        },
    }},
}


def release_config(name: str) -> dict:
    """A deep copy of the release's model.yaml content, safe to modify."""
    return copy.deepcopy(RELEASE_CONFIGS[name])


class GumbelQuantizeWeights(nn.Module):
    """The parameters of taming's GumbelQuantize under its names: proj (z_channels -> n_embed logits), embed."""

    def __init__(self, num_hiddens: int, embedding_dim: int, n_embed: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)


class OfficialVQModel(nn.Module):
    """VQModel / GumbelVQ's module tree (minus Lightning and loss), built the way taming builds it."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        params = config["model"]["params"]
        dd, n_embed, embed_dim = params["ddconfig"], params["n_embed"], params["embed_dim"]
        self.encoder = Encoder(**dd)
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
            self.decoder = Decoder(**dd)
        if config["model"]["target"].endswith("GumbelVQ"):
            self.quantize = GumbelQuantizeWeights(dd["z_channels"], embed_dim, n_embed)
        else:
            self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)


def official_model(config: dict, seed: int) -> OfficialVQModel:
    """Random weights from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OfficialVQModel(config).eval()


class ModelCheckpoint:
    """Pickled as pytorch-lightning's ModelCheckpoint (Lightning keys callback states by callback class)."""

    __module__ = "pytorch_lightning.callbacks.model_checkpoint"


def lightning_checkpoint(state_dict: dict[str, torch.Tensor], seed: int = 0) -> dict:
    """A Lightning checkpoint around ``state_dict``, with discriminator/LPIPS ``loss.*`` weights added."""
    g = torch.Generator().manual_seed(seed)
    loss = {
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4, generator=g),
        "loss.discriminator.main.0.bias": torch.randn(64, generator=g),
        "loss.perceptual_loss.scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None],
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3, generator=g),
        "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1, generator=g),
    }
    adam = {"state": {}, "param_groups": [{"lr": 4.5e-06, "betas": (0.5, 0.9), "eps": 1e-08, "weight_decay": 0,
                                           "amsgrad": False, "params": [0, 1, 2]}]}
    return {
        "epoch": 7,
        "global_step": 123456,
        "pytorch-lightning_version": "1.0.8",
        # monitored values: a tensor, and a numpy scalar as some Lightning versions and loggers leave them
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.25), "best_model_path": "last.ckpt",
                                        "current_score": np.float64(0.25)}},
        "optimizer_states": [adam, copy.deepcopy(adam)],
        "lr_schedulers": [],
        "state_dict": collections.OrderedDict({**state_dict, **loss}),  # Module.state_dict() is an OrderedDict
    }


def write_release(directory: Path, config: dict, state_dict: dict[str, torch.Tensor]) -> tuple[Path, Path]:
    """Write ``directory/configs/model.yaml`` and ``directory/checkpoints/last.ckpt``; returns both paths."""
    config_path = directory / "configs" / "model.yaml"
    ckpt_path = directory / "checkpoints" / "last.ckpt"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    save_lightning(lightning_checkpoint(state_dict), ckpt_path)
    return config_path, ckpt_path


def save_lightning(obj, path: Path, **save_kwargs) -> None:
    """torch.save ``obj`` (which may hold ModelCheckpoint) to ``path``; save_kwargs go to torch.save."""
    with _fake_lightning_module():
        torch.save(obj, path, **save_kwargs)


@contextlib.contextmanager
def _fake_lightning_module():
    """Let pickle store ModelCheckpoint by its Lightning name whether or not pytorch-lightning is installed."""
    module = ModelCheckpoint.__module__
    parts = module.split(".")
    names = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    try:
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        sys.modules[module].ModelCheckpoint = ModelCheckpoint
        yield
    finally:
        for name in names:
            del sys.modules[name]
        sys.modules.update(saved)


def block_lightning(monkeypatch) -> None:
    """Make every pytorch_lightning import fail for the rest of the test, as if it were not installed."""
    for name in [n for n in sys.modules if n == "pytorch_lightning" or n.startswith("pytorch_lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
