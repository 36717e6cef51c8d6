"""Cross-entropy over the rows of a logits chunk in Triton, for `effc::linear_cross_entropy`
(`effc.kernels.linear_ce`): one program per row, two passes over the row in blocks of
BLOCK columns.

Pass 1 keeps a running max m and a running sum s of exp(x - m) (when a block raises the
max, s is rescaled by exp(m_old - m_new)), and reads the target's logit; the row's loss
is m + log(s) - x[target], in float32. Pass 2 overwrites the row IN PLACE with
softmax(x) - onehot(target) = exp(x - m) / s - [col == target], rounded to the logits'
dtype: the gradient of the row's loss with respect to its logits, ready for the two
gradient matmuls (p @ w, p^T @ h). A row whose target is `ignore_index` gets loss 0 and
a row of zeros. Every other target must lie in [0, V): it is not checked (the torch
path's gather raises; this kernel would read out of the row).
Bytes: reads the chunk twice and the targets once, writes the chunk and n floats.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_BLOCK = 4096  # columns a program holds at once; longer rows loop over blocks


def supports(logits: Tensor, targets: Tensor) -> bool:
    """A 2-D contiguous (n, V) chunk in float32/float16/bfloat16 and n int64 targets on the
    same device."""
    return (logits.dim() == 2 and logits.dtype in DTYPES and logits.is_contiguous()
            and logits.shape[1] > 0 and targets.dtype == torch.int64 and targets.dim() == 1
            and targets.shape[0] == logits.shape[0] and targets.device == logits.device)


@triton.jit
def _ce_rows(LOGITS, TARGETS, LOSS, V, ignore_index, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * V
    cols = tl.arange(0, BLOCK)
    t = tl.load(TARGETS + row)
    keep = t != ignore_index
    t_safe = tl.where(keep, t, 0)
    x_t = tl.load(base + t_safe).to(tl.float32)
    # pass 1: online max and sum of exp over the row
    m = tl.max(tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32), axis=0)
    s = 0.0
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LOSS + row, tl.where(keep, lse - x_t, 0.0))
    # pass 2: the row becomes softmax - onehot (zeros for an ignored row)
    inv = 1.0 / s
    for start in range(0, V, BLOCK):
        c = start + cols
        mask = c < V
        x = tl.load(base + c, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - m) * inv - tl.where(c == t_safe, 1.0, 0.0)
        p = tl.where(keep, p, 0.0)
        tl.store(base + c, p.to(LOGITS.dtype.element_ty), mask=mask)


def ce_rows_(logits: Tensor, targets: Tensor, ignore_index: int = -100, *, block: int | None = None) -> Tensor:
    """Per-row loss (n,) float32 of a (n, V) logits chunk against n int64 targets (0 where
    the target is `ignore_index`); overwrites `logits` in place with softmax - onehot.
    `block` (a power of two) overrides the columns per step, min(next_pow2(V), MAX_BLOCK)."""
    assert supports(logits, targets), (logits.shape, logits.dtype, targets.shape, targets.dtype)
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    block = block or min(triton.next_power_of_2(V), MAX_BLOCK)
    _ce_rows[(n,)](logits, targets, loss, V, ignore_index, BLOCK=block)
    return loss
