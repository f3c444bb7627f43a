"""GroupNorm for channels-last fp32 tensors on the CPU, 1.8 to 3.6x faster than torch's kernel.

torch's CPU GroupNorm is slow in channels-last: forward + backward of the embedded VQGAN
decoder's GroupNorm(32, 32) at batch 64 took 11.9 ms at 32x32 (2.7 ms in NCHW) and 4.9 ms at
16x16 (0.5 ms) on a 2-core AMD EPYC, and it loses precision when the mean is large against the
spread. This one computes the same function from per-channel reductions and broadcast
multiply-adds: 6.7 and 1.4 ms there, 1.05 to 1.08x on the whole synthesis step
(`python benchmarks/synthesis_ops.py`; docs/results.md, "Fused swish, channels-last GroupNorm,
pool before ReLU"). It matches `F.group_norm` in float64 to float rounding, values and gradients
alike (tests/test_group_norm.py).

`fast_group_norm(module)` swaps it in for every `nn.GroupNorm` of a module. It keeps the class's
parameters and state-dict keys, and runs torch's own kernel for every other input: NCHW, CUDA,
bf16 under autocast, and tensors too small to gain.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _normalize(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """(x_hat = (x - mean) * rstd, rstd [N, G]) with mean and variance per (sample, group).

    Two passes per channel (the mean, then the mean square about it: no cancellation), then each
    group's moments from its channels' (the mean of their variances plus the variance of their
    means, exact). torch.var_mean would do the first part in one call, but on a channels-last
    tensor it is slower than the whole of this.
    """
    n, c = x.shape[:2]
    k = c // groups
    channel_mean = x.mean(dim=(2, 3))  # [N, C]
    centered = x - channel_mean[:, :, None, None]
    channel_var = (centered * centered).mean(dim=(2, 3)).view(n, groups, k)
    channel_mean = channel_mean.view(n, groups, k)
    group_mean = channel_mean.mean(-1, keepdim=True)
    group_var = channel_var.mean(-1) + (channel_mean - group_mean).square().mean(-1)
    rstd = torch.rsqrt(group_var + eps)  # [N, G]
    if k > 1:  # from each channel's mean to its group's
        centered.add_((channel_mean - group_mean).view(n, c)[:, :, None, None])
    return centered.mul_(_per_channel(rstd, k)), rstd


def _per_channel(t: Tensor, channels_per_group: int) -> Tensor:
    """[N, G] -> [N, C, 1, 1]: each group's value for each of its channels."""
    return t.repeat_interleave(channels_per_group, dim=1)[:, :, None, None]


class _GroupNormFunction(torch.autograd.Function):
    """y = w * x_hat + b with x_hat = (x - mean) * rstd per (sample, group); backward in closed form."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        x_hat, rstd = _normalize(x, groups, eps)
        ctx.save_for_backward(x_hat, weight, rstd)
        ctx.groups = groups
        return torch.addcmul(bias[:, None, None], x_hat, weight[:, None, None])

    @staticmethod
    def backward(ctx, dy: Tensor):
        x_hat, weight, rstd = ctx.saved_tensors
        n, c, h, w = x_hat.shape
        groups = ctx.groups
        k, count = c // groups, h * w * (c // groups)
        dy_sum = dy.sum(dim=(2, 3))                # [N, C]
        dy_x_hat = (dy * x_hat).sum(dim=(2, 3))    # [N, C]
        # With g = w * dy: dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), means over each group.
        g_mean = (weight * dy_sum).view(n, groups, k).sum(-1) / count           # [N, G]
        g_x_hat_mean = (weight * dy_x_hat).view(n, groups, k).sum(-1) / count  # [N, G]
        scale = _per_channel(rstd, k) * weight[:, None, None]
        dx = torch.addcmul((x_hat * _per_channel(-rstd * g_x_hat_mean, k)).sub_(_per_channel(rstd * g_mean, k)),
                           dy, scale)
        d_weight = dy_x_hat.sum(0) if ctx.needs_input_grad[1] else None
        d_bias = dy_sum.sum(0) if ctx.needs_input_grad[2] else None
        return dx, d_weight, d_bias, None, None


# Below this many elements the dozen small ops of the closed form cost more than torch's one kernel;
# at the decoder's [64, 32, 8, 8] (131k) they cost about half of it. Both are printed by
# `python benchmarks/synthesis_ops.py` (its GroupNorm rows; `--batch 2` for the small case).
MIN_ELEMENTS = 2**16


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that takes the fast path for large 4-d channels-last fp32 CPU input (module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and self.affine
                and x.numel() >= MIN_ELEMENTS
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return _GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)


def fast_group_norm(module: nn.Module) -> nn.Module:
    """Every nn.GroupNorm in `module` becomes a `GroupNorm` (same parameters, same keys). In place."""
    for m in module.modules():
        if type(m) is nn.GroupNorm:
            m.__class__ = GroupNorm
    return module
