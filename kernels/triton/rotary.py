"""Rotary embedding ("rotate half" layout) in Triton: one program per token (row of x),
all heads at once as a (heads, head_dim / 2) block; the token's cos and sin row is read
once and broadcast over the heads. Math in float32; x and y in float32, float16 or
bfloat16, the tables in any of those.

The tables are read through strides: (T', hd/2) tables (T' >= T, only the first T rows
used) get a batch stride of 0; (B, T', hd/2) tables, gathered per position, use their own
batch stride (0 too when B is 1, broadcast over the batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 16384  # one token's (heads, head_dim / 2) block, each side padded to a power of two


def supports(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if x.dtype not in DTYPES or cos.dtype not in DTYPES or sin.dtype not in DTYPES:
        return False
    if x.dim() != 3 or x.numel() == 0 or cos.shape != sin.shape or cos.dim() not in (2, 3):
        return False
    if not (x.device == cos.device == sin.device):
        return False
    if cos.shape[-2] < x.shape[1] or (cos.dim() == 3 and cos.shape[0] not in (1, x.shape[0])):
        return False
    return x.shape[-1] <= MAX_WIDTH


def _strides(t: Tensor, B: int) -> tuple[int, int, int]:
    """(batch, position, channel) strides of a table in either layout."""
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return (0 if t.shape[0] == 1 and B != 1 else t.stride(0)), t.stride(1), t.stride(2)


@triton.jit
def _fwd(X, COS, SIN, Y, T, H, HD,
         cs_b, cs_t, cs_h, ss_b, ss_t, ss_h,
         BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    b = row // T
    t = row % T
    half = HD // 2
    heads = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1)
    cols = tl.arange(0, BLOCK_HALF)  # (BLOCK_HALF,)
    cmask = cols < half
    c = tl.load(COS + b * cs_b + t * cs_t + cols * cs_h, mask=cmask, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * ss_b + t * ss_t + cols * ss_h, mask=cmask, other=0.0).to(tl.float32)
    c, s = c[None, :], s[None, :]
    mask = (heads < H) & cmask[None, :]
    base = row * H * HD + heads * HD + cols[None, :]  # channel i of each head
    x1 = tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + base, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + base + half, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def rotary_fwd(x: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """x (B, T, heads * hd) rotated by the tables; y in x's dtype, contiguous."""
    B, T, D = x.shape
    hd = D // heads
    if hd * heads != D or hd % 2:
        raise ValueError(f"rotary: width {D} is not heads={heads} times an even head_dim")
    if cos.shape[-1] != hd // 2:
        raise ValueError(f"rotary: tables of width {cos.shape[-1]}, head_dim {hd} needs {hd // 2}")
    xc = x.contiguous()
    y = torch.empty_like(xc)
    _fwd[(B * T,)](xc, cos, sin, y, T, heads, hd, *_strides(cos, B), *_strides(sin, B),
                   BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(hd // 2))
    return y
