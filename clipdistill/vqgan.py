"""VQGAN image prior for synthesis: taming-transformers' encoder/decoder without Lightning or the GAN loss.

Holds the model, a small CPU-friendly reconstruction trainer, PSNR evaluation, our own checkpoint format and a
loader for the official taming release (YAML config + Lightning .ckpt) whose state_dict keys load unchanged.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

# Only the building blocks: taming.models.vqgan pulls in pytorch-lightning APIs that no longer exist.
from taming.modules.diffusionmodules.model import Decoder, Encoder

__all__ = [
    "VQGANConfig",
    "VQGAN",
    "train_vqgan",
    "reconstruction_psnr",
    "save_checkpoint",
    "load_checkpoint",
    "load_taming_checkpoint",
]

_GROUPNORM_GROUPS = 32  # taming's Normalize() is GroupNorm(32, C)


@dataclass
class VQGANConfig:
    """Architecture of a VQGAN; field names mirror taming's ``ddconfig`` plus ``n_embed``/``embed_dim``.

    resolution: input side in pixels; ``len(ch_mult) - 1`` stride-2 stages give the downsample factor f.
    ch * m for every m in ch_mult must be a multiple of 32 (GroupNorm(32) inside taming's blocks).
    beta: commitment-loss weight (taming hard-codes 0.25).
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
    beta: float = 0.25

    def __post_init__(self) -> None:
        # YAML / checkpoints hand us lists; tuples keep the config hashable and asdict() stable.
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)

    def ddconfig(self) -> dict:
        """Keyword arguments for taming's Encoder/Decoder."""
        d = asdict(self)
        for k in ("embed_dim", "n_embed", "beta"):
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


class VQGAN(nn.Module):
    """taming's VQModel without Lightning or loss: encoder, quant_conv, quantize, post_quant_conv, decoder.

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
        self.quantize = _VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
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
        """The quantizer's embedding weight, [n_embed, embed_dim] (a live parameter, not a copy)."""
        return self.quantize.embedding.weight

    def encode_continuous(self, x: Tensor) -> Tensor:
        """x [B, 3, H, W] in [-1, 1] -> pre-quantisation latents z_e [B, embed_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(x))

    def vector_quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Snap continuous latents to the codebook (straight-through gradient to z).

        z [B, embed_dim, h, w] -> (z_q same shape, qloss scalar, indices [B, h, w] int64). Used by
        synthesis that optimises latents directly (VQGAN-CLIP style).
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


def _validate_config(cfg: VQGANConfig) -> None:
    bad = [m for m in cfg.ch_mult if (cfg.ch * m) % _GROUPNORM_GROUPS]
    if bad or cfg.ch % _GROUPNORM_GROUPS:
        raise ValueError(
            f"VQGANConfig: ch={cfg.ch} * ch_mult={cfg.ch_mult} must all be multiples of {_GROUPNORM_GROUPS} "
            "(taming uses GroupNorm(32))"
        )
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
) -> list[float]:
    """Train ``model`` in place to reconstruct ``images``; returns the total loss of every step.

    images: [N, 3, H, W], uint8 in [0, 255] or float in [0, 1]; mapped to [-1, 1] batch by batch on the
    model's device. Loss per step = L1 + MSE (both on [-1, 1] pixels) + codebook/commitment loss. There is
    no perceptual or adversarial term: both need pretrained networks that would have to be downloaded.
    Adam(betas=(0.5, 0.9)) as in taming. Augmentation: independent random horizontal/vertical flips.

    Dead-code restart: the codebook is trained only through the codebook loss, so a code that never wins
    the nearest-neighbour search gets no gradient and stays dead for ever; with the tiny uniform init most
    codes start that way and the effective vocabulary collapses to a handful of entries (blurry
    reconstructions, few distinct tokens for synthesis). At step 0 and then every ``restart_every`` steps,
    each code unused since the previous restart is re-initialised to a randomly chosen encoder output of
    the current batch, and its Adam moments are cleared so stale momentum does not drag it away again.

    All randomness (batch sampling, flips, restart picks, dropout) derives from ``seed``; the global RNG
    state is left untouched. Same seed, same initial weights and same thread count -> identical weights.
    """
    if steps < 0 or batch_size < 1:
        raise ValueError(f"train_vqgan: need steps >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"train_vqgan: images must be a non-empty [N, C, H, W] tensor, got {tuple(images.shape)}")
    device = _model_device(model)
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    quantizer = model.quantize
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    usage = torch.zeros(quantizer.n_embed, dtype=torch.long, device=device)
    losses: list[float] = []
    was_training = model.training
    model.train()
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            # dropout draws from the global RNG; seed it inside the fork so it is reproducible but not leaked
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            for step in tqdm(range(steps), desc="vqgan", disable=None if progress else True, leave=False):
                idx = torch.randint(0, n, (batch_size,), generator=gen)
                x = _to_unit_float(images[idx]).mul_(2).sub_(1)
                flip_h = torch.rand(batch_size, generator=gen) < 0.5
                flip_v = torch.rand(batch_size, generator=gen) < 0.5
                x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
                x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
                x = x.to(device, non_blocking=True)

                z = model.encode_continuous(x)
                zq, qloss, codes = model.vector_quantize(z)
                rec = model.decode(zq)
                loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + qloss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                usage += torch.bincount(codes.flatten(), minlength=quantizer.n_embed)
                # counting the current batch first means a restart never wipes codes that are in use, so
                # step 0 acts as a data-dependent init for a fresh model and is harmless for a trained one
                if step % restart_every == 0:
                    _restart_dead_codes(quantizer, opt, usage, z.detach(), gen)
                    usage.zero_()
                losses.append(float(loss.detach()))
                if callback is not None:
                    callback(step, losses[-1])
    finally:
        model.train(was_training)
    return losses


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
    weight = quantizer.embedding.weight
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


class CheckpointError(ValueError):
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> VQGAN:
    """Load a file written by ``save_checkpoint`` into a CPU VQGAN in eval mode.

    Raises a one-line ValueError (CheckpointError) naming ``path`` if the file is missing (this one is also
    a FileNotFoundError), unreadable, or lacks the state_dict/config it should hold.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"VQGAN checkpoint {path} does not exist (train it with the vqgan stage)")
    try:
        # our own format holds only tensors and plain containers, so the safe loader suffices
        payload = torch.load(path, map_location="cpu", weights_only=True)
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
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        own = set(model.state_dict())
        missing = sorted(own - set(state_dict))
        unexpected = sorted(set(state_dict) - own)
        detail = f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}" if missing or unexpected else ""
        raise CheckpointError(
            f"VQGAN weights in {path} do not fit the config: {detail or _one_line(exc)[:300]}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# Architecture-changing ddconfig keys this module does not implement, with the only value it supports.
_DDCONFIG_FIXED = {"resamp_with_conv": True, "give_pre_end": False, "tanh_out": False}


def load_taming_checkpoint(config_path: str | os.PathLike, ckpt_path: str | os.PathLike) -> VQGAN:
    """Load an official taming-transformers release: YAML config + Lightning .ckpt -> CPU VQGAN (eval mode).

    The YAML must have ``model.params.{embed_dim, n_embed, ddconfig}`` (parsed with pyyaml). The .ckpt is
    read with ``torch.load(weights_only=False)``, which can execute code: only pass trusted files. Its
    ``state_dict`` is loaded strictly after dropping the training-only ``loss.*`` keys (discriminator,
    LPIPS). VectorQuantizer and VectorQuantizer2 checkpoints share the ``quantize.embedding.weight`` key and
    both load; Gumbel and remapped-codebook models raise NotImplementedError.

    Raises FileNotFoundError naming a missing file, ValueError for malformed files.
    """
    import yaml  # local: only this loader needs it

    config_path, ckpt_path = Path(config_path), Path(ckpt_path)
    for p, what in ((config_path, "config (.yaml)"), (ckpt_path, "checkpoint (.ckpt)")):
        if not p.is_file():
            raise FileNotFoundError(
                f"taming VQGAN {what} not found at {p}: download the official taming-transformers release "
                f"file and place it at exactly this path"
            )
    try:
        raw = yaml.safe_load(config_path.read_text())
        target = str(raw["model"].get("target", ""))
        params = raw["model"]["params"]
        ddconfig = dict(params["ddconfig"])
        n_embed, embed_dim = int(params["n_embed"]), int(params["embed_dim"])
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(
            f"taming config {config_path} is not in the official layout "
            f"(model.params.{{embed_dim,n_embed,ddconfig}}): {_one_line(exc)}"
        ) from exc

    if "Gumbel" in target or "GumbelQuantize" in yaml.safe_dump(params):
        raise NotImplementedError(
            f"taming config {config_path}: GumbelQuantize models ({target}) are not supported yet; "
            "use a VectorQuantizer release such as vqgan_imagenet_f16_1024"
        )
    if params.get("remap") is not None:
        raise NotImplementedError(f"taming config {config_path}: codebook remapping ('remap') is not supported yet")
    for key, supported in _DDCONFIG_FIXED.items():
        if key in ddconfig and bool(ddconfig[key]) != supported:
            raise NotImplementedError(f"taming config {config_path}: ddconfig {key}={ddconfig[key]} is not supported")

    known = {f.name for f in fields(VQGANConfig)} - {"embed_dim", "n_embed", "beta"}
    # taming's Encoder/Decoder swallow unknown kwargs too, so ignoring the rest matches its behaviour
    cfg_kwargs = {k: v for k, v in ddconfig.items() if k in known}
    try:
        cfg = VQGANConfig(embed_dim=embed_dim, n_embed=n_embed, **cfg_kwargs)
        model = VQGAN(cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"taming config {config_path}: unusable ddconfig: {_one_line(exc)}") from exc

    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"taming checkpoint {ckpt_path} is unreadable or corrupt: {_one_line(exc)}") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"taming checkpoint {ckpt_path} holds no state_dict")
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    if "quantize.embed.weight" in state or "quantize.proj.weight" in state:
        raise NotImplementedError(f"taming checkpoint {ckpt_path}: GumbelQuantize weights are not supported yet")
    _load_state(model, state, ckpt_path)
    return model.eval()
