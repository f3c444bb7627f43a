"""VQGAN image prior for synthesis: taming-transformers' encoder/decoder without Lightning or the GAN loss.

Holds the model (nearest-neighbour "vq" or "gumbel" codebook), a small CPU-friendly reconstruction trainer, PSNR
evaluation and our own checkpoint format. Parameter names follow taming's VQModel / GumbelVQ, so official releases
load unchanged: see clipdistill.taming_release.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .group_norm import fast_group_norm
from .resumable import Checkpoints, TensorState, run_steps
from .runtime import PipelineError, autocast, load_weights, save_atomic
from .schedules import cosine_lr

# Only the building blocks: taming.models.vqgan pulls in pytorch-lightning APIs that no longer exist.
import taming.modules.diffusionmodules.model as _taming_model
from taming.modules.diffusionmodules.model import Decoder, Encoder

# taming's swish is `x * torch.sigmoid(x)`: two passes over every block's activations forward and
# three backward, and two saved tensors. F.silu is the same function (equal up to float rounding) in
# one fused pass each way, saving only its input: up to 1.05x on the embedded synthesis step
# (`python benchmarks/synthesis_ops.py`). Every taming Encoder and Decoder calls this module-level
# function at run time, so official releases run it too.
_taming_model.nonlinearity = F.silu

__all__ = [
    "VQGANConfig",
    "VQGAN",
    "train_vqgan",
    "reconstruction_psnr",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "MissingCheckpointError",
]

_GROUPNORM_GROUPS = 32  # taming's Normalize() is GroupNorm(32, C)
# VQGANConfig fields that describe the quantizer; every other field is a taming ddconfig key.
_QUANTIZER_FIELDS = ("embed_dim", "n_embed", "beta", "quantizer", "kl_weight")
# `generator.source`: train this VQGAN here (embedded) or read an official taming release (taming_release.py)
SOURCES = ("embedded", "taming")
# `generator.schedule`: Adam's rate over the run: constant (taming), or a 2 % warm-up then a cosine to 0
SCHEDULES = ("constant", "cosine")


@dataclass
class VQGANConfig:
    """Architecture of a VQGAN; field names mirror taming's ``ddconfig`` plus ``n_embed``/``embed_dim``.

    resolution: input side in pixels; ``len(ch_mult) - 1`` stride-2 stages give the downsample factor f.
    ch * m for every m in ch_mult must be a multiple of 32 (GroupNorm(32) inside taming's blocks).
    quantizer: "vq" (nearest codebook row, taming's VQModel) or "gumbel" (a 1x1 conv predicts logits over the
    codes, taming's GumbelVQ; needs embed_dim == z_channels like the original).
    beta: commitment-loss weight of "vq" (taming hard-codes 0.25).
    kl_weight: weight of the KL-to-uniform-prior term of "gumbel" (GumbelVQ's default 1e-8).
    """

    embed_dim: int = 32
    n_embed: int = 256
    z_channels: int = 32
    resolution: int = 32
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 32
    ch_mult: tuple = (1, 1, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = ()
    dropout: float = 0.0
    double_z: bool = False
    quantizer: str = "vq"
    beta: float = 0.25
    kl_weight: float = 1e-8

    def __post_init__(self) -> None:
        # YAML / checkpoints hand us lists; tuples keep the config hashable and asdict() stable.
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)

    def ddconfig(self) -> dict:
        """Keyword arguments for taming's Encoder/Decoder."""
        d = asdict(self)
        for k in _QUANTIZER_FIELDS:
            d.pop(k)
        return d


class _VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    Our own instead of taming's VectorQuantizer because the PyPI taming (0.0.1) builds a dense [N, n_embed]
    one-hot matrix per call and applies ``beta`` to the wrong term (the "legacy" bug fixed upstream in
    VectorQuantizer2). The parameter is still named ``embedding`` so ``quantize.embedding.weight`` matches
    official checkpoints.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float) -> None:
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    @classmethod
    def from_config(cls, cfg: VQGANConfig) -> _VectorQuantizer:
        return cls(cfg.n_embed, cfg.embed_dim, cfg.beta)

    @property
    def codebook(self) -> Tensor:
        """[n_embed, embed_dim]: the rows that quantised latents are made of."""
        return self.embedding.weight

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z [B, D, h, w] -> (z_q [B, D, h, w] straight-through, loss scalar, indices [B, h, w] int64)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        weight = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ weight.t() + weight.pow(2).sum(1)
        idx = dist.argmin(1)
        zq = F.embedding(idx, weight).view(b, h, w, d).permute(0, 3, 1, 2)
        # codebook term moves codes towards encoder outputs; beta-weighted commitment keeps the encoder close.
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        if z.requires_grad:  # otherwise keep z_q bit-exact codebook rows (z + (zq - z) rounds)
            zq = z + (zq - z).detach()
        return zq.contiguous(), loss, idx.view(b, h, w)


class _GumbelQuantizer(nn.Module):
    """taming's GumbelQuantize at inference: a 1x1 conv gives logits over the codes, the top code's row is z_q.

    Parameter names (``proj``, ``embed``) match official GumbelVQ checkpoints: ``quantize.proj.weight``
    [n_embed, in_channels, 1, 1], ``quantize.proj.bias`` [n_embed], ``quantize.embed.weight`` [n_embed, embed_dim].
    taming draws the code with Gumbel noise even in eval mode; this takes the most likely code, so encoding is
    deterministic. With a gradient (z.requires_grad) the backward pass goes through softmax(logits) (straight-
    through, temperature 1); there is no temperature schedule, so train_vqgan does not train this quantizer.
    """

    def __init__(self, in_channels: int, n_embed: int, embed_dim: int, kl_weight: float) -> None:
        super().__init__()
        self.n_embed, self.embed_dim, self.kl_weight = n_embed, embed_dim, kl_weight
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    @classmethod
    def from_config(cls, cfg: VQGANConfig) -> _GumbelQuantizer:
        # as in GumbelVQ: proj reads z_channels, applied to quant_conv's output (so embed_dim == z_channels)
        return cls(cfg.z_channels, cfg.n_embed, cfg.embed_dim, cfg.kl_weight)

    @property
    def codebook(self) -> Tensor:
        """[n_embed, embed_dim]: the rows that quantised latents are made of."""
        return self.embed.weight

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z [B, C, h, w] -> (z_q [B, embed_dim, h, w], KL loss scalar, indices [B, h, w] int64)."""
        logits = self.proj(z)
        idx = logits.argmax(1)
        zq = F.embedding(idx, self.embed.weight).permute(0, 3, 1, 2)
        probs = logits.softmax(1)
        # taming's prior term: KL(q || uniform over the codes), weighted by kl_weight
        loss = self.kl_weight * (probs * torch.log(probs * self.n_embed + 1e-10)).sum(1).mean()
        if z.requires_grad:  # otherwise keep z_q bit-exact codebook rows
            soft = torch.einsum("bnhw,nd->bdhw", probs, self.embed.weight)
            zq = zq + (soft - soft.detach())
        return zq.contiguous(), loss, idx


# quantizer name in VQGANConfig -> module; both expose n_embed, codebook and forward(z) -> (z_q, loss, idx)
_QUANTIZERS: dict[str, type[nn.Module]] = {"vq": _VectorQuantizer, "gumbel": _GumbelQuantizer}


class VQGAN(nn.Module):
    """taming's VQModel / GumbelVQ minus Lightning and loss: encoder, quant_conv, quantize, post_quant_conv, decoder.

    Attribute names match taming, so official ``state_dict`` keys (minus ``loss.*``) load directly.
    Images are [B, in_channels, H, W] in [-1, 1]; latents are [B, embed_dim, H/f, W/f] with
    f = ``downsample_factor``.
    """

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        _validate_config(cfg)
        self.cfg = cfg
        self.downsample_factor: int = 2 ** (len(cfg.ch_mult) - 1)
        dd = cfg.ddconfig()
        self.encoder = Encoder(**dd)
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape on construction
            self.decoder = Decoder(**dd)
        self.quantize = _QUANTIZERS[cfg.quantizer].from_config(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        fast_group_norm(self)  # torch's CPU GroupNorm is slow in channels-last (clipdistill/group_norm.py)
        self._init_weights()

    def _init_weights(self) -> None:
        # PyTorch's default conv init (kaiming_uniform, a=sqrt(5)) shrinks activations ~2x per layer; on the
        # tiny CPU configs that left reconstructions stuck near the per-image mean colour for hundreds of
        # steps. He-normal init trains several dB further in the same budget. Loaded weights overwrite it.
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                nn.init.zeros_(mod.bias)

    @property
    def codebook(self) -> Tensor:
        """The codebook [n_embed, embed_dim], a live parameter (not a copy); quantised latents are its rows.

        ``quantize.embedding.weight`` for quantizer "vq", ``quantize.embed.weight`` for "gumbel".
        """
        return self.quantize.codebook

    def encode_continuous(self, x: Tensor) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> pre-quantisation latents z_e [B, embed_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(x))

    def vector_quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantise continuous latents with the model's quantizer (straight-through gradient to z).

        z [B, embed_dim, h, w] -> (z_q same shape made of codebook rows, qloss scalar, indices [B, h, w] int64).
        "vq" picks the nearest codebook row, "gumbel" the code with the largest predicted logit.
        """
        return self.quantize(z)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> (z_q [B, embed_dim, H/f, W/f], qloss scalar, indices [B, H/f, W/f])."""
        return self.vector_quantize(self.encode_continuous(x))

    def decode(self, z_q: Tensor) -> Tensor:
        """z_q [B, embed_dim, h, w] -> images [B, out_ch, h*f, w*f], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Code indices [B, h, w] (int64) -> images [B, out_ch, h*f, w*f] roughly in [-1, 1]."""
        zq = F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()
        return self.decode(zq)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> (reconstruction [B, 3, H, W], qloss scalar)."""
        zq, qloss, _ = self.encode(x)
        return self.decode(zq), qloss


def embedded_vqgan_config(section, image_size: int) -> VQGANConfig:
    """The VQGAN a `generator` params section (source embedded) describes, at `image_size`."""
    return VQGANConfig(embed_dim=section.embed_dim, n_embed=section.n_embed, z_channels=section.embed_dim,
                       resolution=image_size, ch=section.ch, ch_mult=tuple(section.ch_mult),
                       num_res_blocks=section.num_res_blocks)


def _validate_config(cfg: VQGANConfig) -> None:
    if cfg.quantizer not in _QUANTIZERS:
        raise ValueError(f"VQGANConfig: quantizer {cfg.quantizer!r} is not one of {sorted(_QUANTIZERS)}")
    if cfg.quantizer == "gumbel" and cfg.embed_dim != cfg.z_channels:
        # GumbelQuantize's proj conv takes z_channels inputs but is applied to quant_conv's embed_dim outputs
        raise ValueError(
            f"VQGANConfig: quantizer 'gumbel' needs embed_dim == z_channels, got {cfg.embed_dim} and {cfg.z_channels}"
        )
    bad = [m for m in cfg.ch_mult if (cfg.ch * m) % _GROUPNORM_GROUPS]
    if bad or cfg.ch % _GROUPNORM_GROUPS:
        raise ValueError(
            f"VQGANConfig: ch={cfg.ch} * ch_mult={cfg.ch_mult} must all be multiples of {_GROUPNORM_GROUPS} "
            "(taming uses GroupNorm(32))"
        )
    if cfg.num_res_blocks == 0 and any(m != 1 for m in cfg.ch_mult[:-1]):
        # taming's Encoder widens a level only inside its res blocks: with none, the next level's
        # downsample is built for a width it never gets
        raise ValueError(f"VQGANConfig: with num_res_blocks=0 every ch_mult entry but the last must be 1, got {cfg.ch_mult}")
    f = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.resolution % f:
        raise ValueError(f"VQGANConfig: resolution {cfg.resolution} is not divisible by downsample factor {f}")
    if cfg.double_z:
        # quant_conv takes z_channels inputs, as in taming; a doubled encoder output would not fit it.
        raise ValueError("VQGANConfig: double_z=True is for the KL autoencoder, a VQGAN needs double_z=False")


# --------------------------------------------------------------------------------------------- training


def _to_unit_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_vqgan(
    model: VQGAN,
    images: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
    restart_every: int = 100,
    callback: Callable[[int, float], None] | None = None,
    checkpoints: Checkpoints | None = None,
    schedule: str = "constant",
    amp_dtype: torch.dtype | None = None,
) -> list[float]:
    """Train a quantizer "vq" ``model`` in place to reconstruct ``images``; returns the total loss of every step.

    images: [N, 3, H, W], uint8 in [0, 255] or float in [0, 1]; mapped to [-1, 1] batch by batch on the
    model's device. Loss per step = L1 + MSE (both on [-1, 1] pixels) + codebook/commitment loss. There is
    no perceptual or adversarial term: both need pretrained networks that would have to be downloaded.
    Adam(betas=(0.5, 0.9)) as in taming. Augmentation: independent random horizontal/vertical flips.
    ``schedule``: "constant" keeps ``lr`` (taming's trainer); "cosine" warms up over the first 2 % of the steps
    and then decays to 0, which reaches a given PSNR in about a third of the steps (docs/results.md).
    ``amp_dtype`` (e.g. bf16) runs the encoder and decoder under autocast; the quantizer's nearest-code
    search, the losses, the weights and Adam's state stay fp32.

    Dead-code restart: the codebook is trained only through the codebook loss, so a code that never wins
    the nearest-neighbour search gets no gradient and stays dead for ever; with the tiny uniform init most
    codes start that way and the effective vocabulary collapses to a handful of entries (blurry
    reconstructions, few distinct tokens for synthesis). At step 0 and then every ``restart_every`` steps,
    each code unused since the previous restart is re-initialised to a randomly chosen encoder output of
    the current batch, and its Adam moments are cleared so stale momentum does not drag it away again.

    All randomness (batch sampling, flips, restart picks, dropout) derives from ``seed``; the global RNG
    state is left untouched. Same seed, same initial weights and same thread count -> identical weights.
    ``checkpoints`` makes the run resumable (``resumable.run_steps``): a resumed run ends identical too.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"train_vqgan: need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if schedule not in SCHEDULES:
        raise ValueError(f"train_vqgan: schedule {schedule!r} is not one of {SCHEDULES}")
    if model.cfg.quantizer != "vq":
        # dead-code restarts move codebook rows towards encoder outputs, which only revives nearest-neighbour codes
        raise ValueError(f"train_vqgan: trains quantizer 'vq' models only, got {model.cfg.quantizer!r}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"train_vqgan: images must be a non-empty [N, C, H, W] tensor, got {tuple(images.shape)}")
    device = _model_device(model)
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    quantizer = model.quantize
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(schedule, steps))
    usage = TensorState(torch.zeros(quantizer.n_embed, dtype=torch.long, device=device))
    was_training = model.training
    model.train()
    fork_devices = [device] if device.type == "cuda" else []

    def step_fn(step: int) -> float:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        x = _to_unit_float(images[idx]).mul_(2).sub_(1)
        # the flips are drawn on the CPU generator (the same draws on every device) and applied where
        # the images are (the stage keeps them on the model's device)
        flip_h = (torch.rand(batch_size, generator=gen) < 0.5).to(x.device)
        flip_v = (torch.rand(batch_size, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
        x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
        x = x.to(device, non_blocking=True)

        with autocast(device, amp_dtype):
            z = model.encode_continuous(x)
        zq, qloss, codes = model.vector_quantize(z.float())
        with autocast(device, amp_dtype):
            rec = model.decode(zq)
        rec = rec.float()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + qloss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage.tensor += torch.bincount(codes.flatten(), minlength=quantizer.n_embed)
        # counting the current batch first means a restart never wipes codes that are in use, so
        # step 0 acts as a data-dependent init for a fresh model and is harmless for a trained one
        if step % restart_every == 0:
            _restart_dead_codes(quantizer, opt, usage.tensor, z.detach(), gen)
            usage.tensor.zero_()
        value = float(loss.detach())
        if callback is not None:
            callback(step, value)
        return value

    try:
        with torch.random.fork_rng(devices=fork_devices):
            # dropout draws from the global RNG; seed it inside the fork so it is reproducible but not leaked
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            losses = run_steps(step_fn, steps, state={"model": model, "optimizer": opt, "scheduler": sched, "usage": usage},
                               generators=[gen], checkpoints=checkpoints, desc="vqgan", progress=progress)
    finally:
        model.train(was_training)
    return losses


def _lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    if schedule == "cosine":
        warmup = max(1, steps // 50)
        return lambda s: cosine_lr(s, steps, warmup)
    return lambda s: 1.0


def generator_lrs(section) -> list[float]:
    """Adam's rate at every step of a `generator` params section's training run, for the curves."""
    factor = _lr_factor(section.schedule, section.steps)
    return [section.lr * factor(s) for s in range(section.steps)]


@torch.no_grad()
def _restart_dead_codes(
    quantizer: _VectorQuantizer, opt: torch.optim.Adam, usage: Tensor, z: Tensor, gen: torch.Generator
) -> int:
    """Re-seed codes with zero ``usage`` from random rows of z [B, D, h, w]; returns how many were reset."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    candidates = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(0, candidates.shape[0], (dead.numel(),), generator=gen).to(candidates.device)
    weight = quantizer.codebook
    weight[dead] = candidates[pick].to(weight.dtype)
    state = opt.state.get(weight, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    return int(dead.numel())


@torch.no_grad()
def reconstruction_psnr(model: VQGAN, images: Tensor, batch_size: int = 256) -> float:
    """PSNR in dB of the model's reconstructions on images [N, 3, H, W] (uint8 or float in [0, 1]).

    Reconstructions are clamped to [0, 1]; the PSNR is 10*log10(1 / MSE) with the MSE pooled over every
    pixel of the set (not a mean of per-image PSNRs). Runs in eval mode and restores the previous mode.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    sq_err, count = 0.0, 0
    try:
        for start in range(0, images.shape[0], batch_size):
            x = _to_unit_float(images[start : start + batch_size]).to(device)
            rec, _ = model(x * 2 - 1)
            rec = ((rec + 1) / 2).clamp(0, 1)
            sq_err += float((rec - x).double().pow(2).sum())
            count += x.numel()
    finally:
        model.train(was_training)
    mse = sq_err / max(count, 1)
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------- checkpoints


class CheckpointError(PipelineError, ValueError):
    """A checkpoint file is missing, unreadable or lacks expected content."""


class MissingCheckpointError(FileNotFoundError, CheckpointError):
    """The checkpoint file does not exist (catchable as FileNotFoundError or ValueError)."""


def save_checkpoint(model: VQGAN, cfg: VQGANConfig, path: str | os.PathLike) -> None:
    """Write {"state_dict": CPU tensors, "config": asdict(cfg)} to ``path`` atomically (tmp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(cfg),
    }
    # a crash mid-write must never leave a truncated file that DVC would then cache as the stage output
    save_atomic(payload, path)


def load_checkpoint(path: str | os.PathLike) -> VQGAN:
    """Load a file written by ``save_checkpoint`` into a CPU VQGAN in eval mode.

    Raises a one-line ValueError (CheckpointError) naming ``path`` if the file is missing (this one is also
    a FileNotFoundError), unreadable, or lacks the state_dict/config it should hold.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"VQGAN checkpoint {path} does not exist (the generator stage writes it)")
    try:
        # our own format holds only tensors and plain containers, so the safe loader suffices
        payload = load_weights(path)
    except Exception as exc:
        raise CheckpointError(f"VQGAN checkpoint {path} is unreadable or corrupt: {_one_line(exc)}") from exc
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"VQGAN checkpoint {path} lacks 'state_dict'/'config' (found {found})")
    try:
        cfg = _config_from_dict(payload["config"])
        model = VQGAN(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"VQGAN checkpoint {path} has an invalid config: {_one_line(exc)}") from exc
    _load_state(model, payload["state_dict"], path)
    return model.eval()


def _config_from_dict(d: dict) -> VQGANConfig:
    known = {f.name for f in fields(VQGANConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    return VQGANConfig(**d)


def _load_state(model: VQGAN, state_dict: dict, path: Path) -> None:
    """Strictly load ``state_dict`` into ``model``; a mismatch raises a one-line CheckpointError naming ``path``."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = [
        f"{k} {list(v.shape)} in the file vs {list(own[k].shape)} from the config"
        for k, v in sorted(state_dict.items())
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
    ]
    problems = [
        f"{what} {_first(items)}"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong_shape))
        if items
    ]
    if problems:
        raise CheckpointError(f"VQGAN weights in {path} do not fit the config: {'; '.join(problems)}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a value that is not a tensor
        raise CheckpointError(f"VQGAN weights in {path} do not load: {_one_line(exc)[:300]}") from exc


def _first(items: list, n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
