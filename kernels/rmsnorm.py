"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467): y = x / rms(x) * w, rms over the last dim.

`rms_norm_ref` is the reference: the composed formula, which autograd differentiates by
keeping several full-width intermediates. It is also the pattern the compiler's kernel
swap looks for in the fx graph (`effc.compiler.swaps`).

`rms_norm` is the kernel: the custom op `effc::rms_norm` (fake kernel, autograd, CPU
kernel; the CUDA kernel is Triton, `effc.kernels.triton.rmsnorm`). It returns y and the
per-row reciprocal rms, and backward (`effc::rms_norm_backward`) keeps only x and rstd (one
float per row), which is what the cost model counts. Statistics are computed in float32
(float64 for float64 inputs); y is in x's dtype.
Bytes: reads x (N*D) and w (D), writes y (N*D) and rstd (N).
"""

from __future__ import annotations

import torch
from torch import Tensor

from effc.kernels import math_dtype


def rms_norm_ref(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rms_norm_forward_torch(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The CPU path: (y, rstd) in three fused-by-torch passes."""
    xf = x.to(math_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)  # (...,)
    return (xf * rstd.unsqueeze(-1) * w).to(x.dtype), rstd


def rms_norm_backward_torch(g: Tensor, x: Tensor, w: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(grad x, grad w) of y = x * rstd * w; gw in w's dtype, summed over every row."""
    sd = rstd.dtype
    xhat = x.to(sd) * rstd.unsqueeze(-1)
    gf = g.to(sd)
    gw = (gf * xhat).reshape(-1, x.shape[-1]).sum(0).to(w.dtype)
    gy = gf * w.to(sd)
    # d/dx of x * rstd: rstd * (gy - xhat * mean(gy * xhat)), computed in xhat's buffer
    m = (gy * xhat).mean(-1, keepdim=True)
    gx = xhat.mul_(m).neg_().add_(gy).mul_(rstd.unsqueeze(-1)).to(x.dtype)
    return gx, gw


@torch.library.custom_op("effc::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return rms_norm_forward_torch(x, w, eps)


@_rms_norm.register_kernel("cuda")
def _(x, w, eps):
    from effc.kernels.triton import rmsnorm as T

    if not T.supports(x, w):
        return rms_norm_forward_torch(x, w, eps)
    return T.rms_norm_fwd(x, w, eps)


@_rms_norm.register_fake
def _(x, w, eps):
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=math_dtype(x.dtype))


@torch.library.custom_op("effc::rms_norm_backward", mutates_args=())
def _rms_norm_backward(g: Tensor, x: Tensor, w: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    return rms_norm_backward_torch(g, x, w, rstd)


@_rms_norm_backward.register_kernel("cuda")
def _(g, x, w, rstd):
    from effc.kernels.triton import rmsnorm as T

    if not T.supports(x, w):
        return rms_norm_backward_torch(g, x, w, rstd)
    return T.rms_norm_bwd(g, x, w, rstd)


@_rms_norm_backward.register_fake
def _(g, x, w, rstd):
    return torch.empty_like(x), torch.empty_like(w)


def _setup(ctx, inputs, output):
    x, w, _ = inputs
    ctx.save_for_backward(x, w, output[1])


def _backward(ctx, gy, _grstd):
    x, w, rstd = ctx.saved_tensors
    gx, gw = torch.ops.effc.rms_norm_backward(gy.contiguous(), x, w, rstd)
    return (gx if ctx.needs_input_grad[0] else None), (gw if ctx.needs_input_grad[1] else None), None


_rms_norm.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return torch.ops.effc.rms_norm(x, w, eps)[0]
