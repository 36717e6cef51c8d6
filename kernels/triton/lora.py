"""LoRA linear in Triton: one matmul kernel with a low-rank epilogue,

    mm_lowrank(x, w, u, v, scale, bias) = x @ w + scale * (u @ v) (+ bias),

x (N, K), w (K, M), u (N, r), v (r, M), every operand read through its strides (so W^T and
g^T are views, never copies). One program per (BLOCK_N, BLOCK_M) tile of the output (tiles
grouped along N for L2 reuse on a GPU) and one float32 accumulator: a short loop over r
puts u @ v in it, which is scaled there (in float32: no 16-bit rounding of scale * u, no
second tile of registers), then the loop over K accumulates x @ w on top with tl.dot, then
bias, then one store in x's dtype. float32 operands use input_precision="ieee" (no TF32),
so results match torch's float32 matmul up to summation order.

The op's launchers:
  forward   xa = xd A^T (torch), y = mm_lowrank(x, W^T, xa, B^T, scale, bias);
  backward  gB = scale * g B (torch, N x r), grad x = mm_lowrank(g, W, gB, A, 1) when the
            adapter reads x (else mm_lowrank(g, W) and grad xd = gB A), grad W =
            mm_lowrank(g^T, x), grad A = gB^T xin, grad B = scale * g^T xa (torch: their
            outputs are r wide, too narrow for a tile).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(*tensors: Tensor | None) -> bool:
    """Every tensor given (None skipped) in one dtype of DTYPES, non-empty, and at least
    1-D (activations are taken as 2-D (rows, width) after reshape)."""
    ts = [t for t in tensors if t is not None]
    return (len(ts) > 0 and ts[0].dtype in DTYPES and all(t.dtype == ts[0].dtype for t in ts)
            and all(t.dim() >= 1 and t.numel() > 0 for t in ts))


@triton.jit
def _mm_lowrank(X, W, U, V, BIAS, Y, N, M, K, R, scale,
                sxn, sxk, swk, swm, sun, sur, svr, svm, syn, sym,
                HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr, GROUP_N: tl.constexpr):
    # tile order: GROUP_N row-tiles share each column sweep (w's tiles stay in L2)
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_N * tiles_m
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_m = (pid % per_group) // group_size

    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_n = rn < N
    mask_m = rm < M
    # the low-rank term first: (u @ v) in the fp32 accumulator, scaled there, exactly as
    # float32 (no rounding of scale * u to 16 bits, no second (BLOCK_N, BLOCK_M) tile)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    rr = tl.arange(0, BLOCK_R)
    up = U + rn[:, None] * sun + rr[None, :] * sur
    vp = V + rr[:, None] * svr + rm[None, :] * svm
    for r0 in range(0, R, BLOCK_R):
        rin = (r0 + rr) < R
        ut = tl.load(up, mask=mask_n[:, None] & rin[None, :], other=0.0)
        vt = tl.load(vp, mask=rin[:, None] & mask_m[None, :], other=0.0)
        acc = tl.dot(ut, vt, acc, input_precision=PRECISION)
        up += BLOCK_R * sur
        vp += BLOCK_R * svr
    acc = acc * scale

    # then the main product accumulates on top of it
    rk = tl.arange(0, BLOCK_K)
    xp = X + rn[:, None] * sxn + rk[None, :] * sxk
    wp = W + rk[:, None] * swk + rm[None, :] * swm
    for k0 in range(0, K, BLOCK_K):
        kin = (k0 + rk) < K
        xt = tl.load(xp, mask=mask_n[:, None] & kin[None, :], other=0.0)
        wt = tl.load(wp, mask=kin[:, None] & mask_m[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        xp += BLOCK_K * sxk
        wp += BLOCK_K * swk

    if HAS_BIAS:
        acc += tl.load(BIAS + rm, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    yp = Y + rn[:, None] * syn + rm[None, :] * sym
    tl.store(yp, acc.to(Y.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit operands


def _blocks(x: Tensor, r: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_K, BLOCK_R, num_warps, num_stages)."""
    block_r = max(16, min(64, triton.next_power_of_2(max(r, 1))))
    if x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        if x.dtype == torch.float32:  # ieee fp32 runs on the FMA units: smaller tiles
            return 64, 64, 32, block_r, 4, 3
        return 128, 128, 32, block_r, 8, 3
    return 32, 32, 32, block_r, 4, 1  # the interpreter: small tiles run fastest


def mm_lowrank(x: Tensor, w: Tensor, u: Tensor | None = None, v: Tensor | None = None,
               scale: float = 1.0, bias: Tensor | None = None) -> Tensor:
    """x (N, K) @ w (K, M) + scale * u (N, r) @ v (r, M) (+ bias (M,)), fresh (N, M) in x's
    dtype, float32 accumulation. Any strides; u, v None (or r = 0) for a plain matmul.
    x, w share one dtype; u, v are cast to x's dtype when they differ (they are small)."""
    assert x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[0], (x.shape, w.shape)
    assert w.dtype == x.dtype, (x.dtype, w.dtype)
    N, K = x.shape
    M = w.shape[1]
    if u is None or u.shape[1] == 0:
        u, v, R = x, w, 0  # never read: the low-rank loop runs zero times
    else:
        assert u.shape[0] == N and v.shape[1] == M and u.shape[1] == v.shape[0], (u.shape, v.shape)
        u, v, R = u.to(x.dtype), v.to(x.dtype), u.shape[1]
    y = torch.empty(N, M, dtype=x.dtype, device=x.device)
    if N == 0 or M == 0:
        return y
    bn, bm, bk, br, warps, stages = _blocks(x, R)
    grid = (triton.cdiv(N, bn) * triton.cdiv(M, bm),)
    _mm_lowrank[grid](
        x, w, u, v, bias.contiguous() if bias is not None else y, y, N, M, K, R, float(scale),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
        v.stride(0), v.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype),
        BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, GROUP_N=8, num_warps=warps, num_stages=stages)
    return y


def _mm_scaled(m1: Tensor, m2: Tensor, scale: float) -> Tensor:
    """scale * (m1 @ m2) with the scale applied before the one rounding to the dtype."""
    return torch.addmm(m1.new_zeros(()), m1, m2, beta=0, alpha=scale)


def lora_fwd(x: Tensor, xd: Tensor | None, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
             scale: float) -> tuple[Tensor, Tensor]:
    """(y (..., out), xa (..., r)) in x's dtype, as `effc::lora_linear`."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    xin2 = x2 if xd is None else xd.reshape(-1, n_in)
    xa = torch.mm(xin2, a.t())
    y = mm_lowrank(x2, w.t(), xa, b.t(), scale, bias)
    return y.view(*lead, w.shape[0]), xa.view(*lead, a.shape[0])


def lora_bwd(g: Tensor, x: Tensor | None, xd: Tensor | None, w: Tensor, a: Tensor, b: Tensor,
             xa: Tensor | None, scale: float, has_xd: bool, need_x: bool, need_xd: bool, need_w: bool,
             need_bias: bool, need_a: bool, need_b: bool) -> tuple[Tensor | None, ...]:
    """(grad x, grad xd, grad W, grad bias, grad A, grad B) as `effc::lora_linear_backward`."""
    lead, n_in = g.shape[:-1], w.shape[1]
    g2 = g.reshape(-1, g.shape[-1])
    gx = gxd = gw = gbias = ga = gb = None
    lowrank_in = need_xd if has_xd else need_x
    gbs = _mm_scaled(g2, b, scale) if lowrank_in or need_a else None  # (N, r)
    if need_x:
        gx = mm_lowrank(g2, w) if has_xd else mm_lowrank(g2, w, gbs, a)
        gx = gx.view(*lead, n_in)
    if need_xd:
        gxd = torch.mm(gbs, a).view(*lead, n_in)
    if need_w:
        gw = mm_lowrank(g2.t(), x.reshape(-1, n_in))
    if need_bias:
        gbias = g2.sum(0, dtype=torch.float32).to(g.dtype)
    if need_a:
        xin = xd if has_xd else x
        ga = torch.mm(gbs.t(), xin.reshape(-1, n_in))
    if need_b:
        gb = _mm_scaled(g2.t(), xa.reshape(-1, a.shape[0]), scale)
    return gx, gxd, gw, gbias, ga, gb
