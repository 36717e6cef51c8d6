"""Rotary position embedding (Su et al. 2021, arXiv:2104.09864), "rotate half" layout as in
Llama checkpoints: within each head, channel i pairs with channel i + head_dim/2.

Legend: x_BTD is (batch, seq, heads * head_dim); cos_TH and sin_TH are (seq, head_dim / 2)
(possibly longer than the sequence: only the first T rows are used), or, for packed
sequences whose positions restart at each record, the tables gathered at each token's
position (`at_positions`): (batch, seq, head_dim / 2).

`rotary_ref` is the reference: the rotation in torch ops, which autograd differentiates
on its own.

`rotary` is the kernel: the custom op `effc::rotary` (fake kernel, autograd, CPU kernel;
the CUDA kernel is Triton, `effc.kernels.triton.rotary`). It saves no activation: the
rotation is orthogonal, so backward is the same op applied to the gradient with -sin,
keeping only the constant tables. Math runs in float32 (float64 for float64 x); y is in
x's dtype.
Bytes: reads x (N*D) and the tables, writes y (N*D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from effc.kernels import math_dtype


def rotary_tables(seq: int, head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                  low_freq: float = 1.0, high_freq: float = 4.0, original_seq: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * f_i, each (seq, head_dim / 2), fp32, with the frequencies
    f_i = theta^(-2i/head_dim) rescaled as Hugging Face's rope types do: "linear" divides
    them by `factor`; "llama3" (Llama 3.1) divides those whose wavelength 2 pi / f is
    above original_seq / low_freq by `factor`, keeps those below original_seq / high_freq,
    and blends linearly in between (in original_seq / wavelength)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        smooth = ((original_seq / wavelen - low_freq) / (high_freq - low_freq)).clamp(0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    elif scaling != "none":
        raise ValueError(f"unknown rotary scaling {scaling!r}")
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)  # (T, hd/2)
    return angles.cos().float(), angles.sin().float()


def at_positions(table_TH: torch.Tensor, positions_BT: torch.Tensor | None) -> torch.Tensor:
    """The table's rows at each token's position, (B, T, hd/2); the table itself when every
    sequence starts at position 0 (positions None)."""
    return table_TH if positions_BT is None else table_TH[positions_BT]


def _rotate(x_BTD: torch.Tensor, cos_TH: torch.Tensor, sin_TH: torch.Tensor, heads: int) -> torch.Tensor:
    B, T, D = x_BTD.shape
    x = x_BTD.view(B, T, heads, D // heads)  # (B, T, H, hd)
    x1, x2 = x.chunk(2, dim=-1)  # each (B, T, H, hd/2)
    if cos_TH.dim() == 2:
        c, s = cos_TH[:T, None, :], sin_TH[:T, None, :]  # (T, 1, hd/2), broadcast over heads
    else:
        c, s = cos_TH[:, :T, None, :], sin_TH[:, :T, None, :]  # (B, T, 1, hd/2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).view(B, T, D)


def rotary_ref(x_BTD, cos_TH, sin_TH, heads: int):
    return _rotate(x_BTD, cos_TH, sin_TH, heads)


def rotary_torch(x_BTD: Tensor, cos_TH: Tensor, sin_TH: Tensor, heads: int) -> Tensor:
    """The CPU path: `_rotate` in the math dtype of x, rounded once to x's dtype."""
    md = math_dtype(x_BTD.dtype)
    y = _rotate(x_BTD.contiguous().to(md), cos_TH.to(md), sin_TH.to(md), heads)
    return y.to(x_BTD.dtype)


@torch.library.custom_op("effc::rotary", mutates_args=())
def _rotary(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    return rotary_torch(x, cos, sin, heads)


@_rotary.register_kernel("cuda")
def _(x, cos, sin, heads):
    from effc.kernels.triton import rotary as T

    if not T.supports(x, cos, sin):
        return rotary_torch(x, cos, sin, heads)
    return T.rotary_fwd(x, cos, sin, heads)


@_rotary.register_fake
def _(x, cos, sin, heads):
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output):
    _, cos, sin, heads = inputs
    ctx.save_for_backward(cos, sin)  # constants, not activations
    ctx.heads = heads


def _backward(ctx, g):
    cos, sin = ctx.saved_tensors
    # The rotation is orthogonal: its transpose is the rotation by -theta.
    gx = torch.ops.effc.rotary(g.contiguous(), cos, -sin, ctx.heads)
    return (gx if ctx.needs_input_grad[0] else None), None, None, None


_rotary.register_autograd(_backward, setup_context=_setup)


def rotary(x_BTD: Tensor, cos_TH: Tensor, sin_TH: Tensor, heads: int) -> Tensor:
    return torch.ops.effc.rotary(x_BTD, cos_TH, sin_TH, heads)
