"""RMSNorm forward and backward in Triton: one program per row (forward), one program per
block of rows (backward, with per-program partial sums of the weight's gradient reduced
in torch). Statistics in float32; x, w, y in float32, float16 or bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 65536  # one row must fit in one block


def supports(x: Tensor, w: Tensor) -> bool:
    return x.dtype in DTYPES and w.dtype in DTYPES and x.shape[-1] <= MAX_WIDTH and x.numel() > 0


@triton.jit
def _fwd(X, W, Y, RSTD, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * D + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(G, X, W, RSTD, GX, GW, N, D, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    gw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS):
        row = (pid * ROWS + i).to(tl.int64)
        if row < N:
            x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(G + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            gy = g * w
            m = tl.sum(gy * xhat, axis=0) / D
            tl.store(GX + row * D + cols, ((gy - xhat * m) * rstd).to(GX.dtype.element_ty), mask=mask)
            gw += g * xhat
    tl.store(GW + pid * D + cols, gw, mask=mask)


def rms_norm_fwd(x: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y in x's dtype, rstd (x.shape[:-1]) float32)."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    N = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    _fwd[(N,)](x2, w.contiguous(), y, rstd, D, eps, BLOCK=triton.next_power_of_2(D))
    return y.view(x.shape), rstd.view(x.shape[:-1])


def rms_norm_bwd(g: Tensor, x: Tensor, w: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """(grad x in x's dtype, grad w in w's dtype)."""
    D = x.shape[-1]
    x2, g2 = x.reshape(-1, D).contiguous(), g.reshape(-1, D).contiguous()
    N = x2.shape[0]
    gx = torch.empty_like(x2)
    rows = 16 if N >= 4096 else 4
    programs = triton.cdiv(N, rows)
    partial = torch.empty(programs, D, dtype=torch.float32, device=x.device)
    _bwd[(programs,)](g2, x2, w.contiguous(), rstd.reshape(-1).contiguous(), gx, partial, N, D,
                      ROWS=rows, BLOCK=triton.next_power_of_2(D))
    return gx.view(x.shape), partial.sum(0).to(w.dtype)
