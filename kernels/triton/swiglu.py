"""SwiGLU forward and backward in Triton: elementwise, one program per 1-D block of the
flattened (contiguous) tensors. Math in float32; gate, up, g and the outputs in float32,
float16 or bfloat16 (each output in its input's dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024


def supports(gate: Tensor, up: Tensor) -> bool:
    return (gate.dtype in DTYPES and up.dtype == gate.dtype and gate.shape == up.shape
            and gate.device == up.device and gate.numel() > 0)


@triton.jit
def _fwd(GATE, UP, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(G, GATE, UP, GG, GU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    # y = a * s(a) * b: dy/db = a * s, dy/da = b * s * (1 + a * (1 - s))
    tl.store(GU + offs, (g * a * s).to(GU.dtype.element_ty), mask=mask)
    tl.store(GG + offs, (g * b * s * (1.0 + a * (1.0 - s))).to(GG.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in gate's dtype, contiguous, gate's shape."""
    a, b = gate.contiguous(), up.contiguous()
    y = torch.empty_like(a)
    n = a.numel()
    _fwd[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK)
    return y


def swiglu_bwd(g: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(grad gate in gate's dtype, grad up in up's dtype), contiguous."""
    gc, a, b = g.contiguous(), gate.contiguous(), up.contiguous()
    g_gate, g_up = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    _bwd[(triton.cdiv(n, BLOCK),)](gc, a, b, g_gate, g_up, n, BLOCK=BLOCK)
    return g_gate, g_up
