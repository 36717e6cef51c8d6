"""Quantized linear layers in Triton: y = x @ dequant(W).T (+ bias), W dequantized in
registers, tile by tile, never written to memory. The storage formats are
`effc.kernels.quant`'s (its module docstring): int8 per-row symmetric, int4 asymmetric
groups, NF4 blocks; the 4-bit ones pack column 2j in a byte's low nibble and 2j + 1 in its
high nibble.

One program computes a (BM, BN) tile of y; x is (N, K), W is (OUT, K). Accumulation is
float32; y is in x's dtype. The weight tile is multiplied in x's dtype (fp32 with
input_precision="ieee", so fp32 x matches torch's fp32 matmul rather than TF32), and is
exact in that dtype, so the only differences from the float32 reference
`x.float() @ dequant(W).T` are the summation order and the output's rounding:

* int8: the codes q in [-127, 127] are exact in fp16/bf16; the row scale multiplies the
  finished dot product.
* int4: K is walked group by group (BK divides the group); the dot runs on the exact
  integers q - zero in [-15, 15] and the group's scale multiplies each group's partial sum.
  Each K tile loads BK / 2 bytes per row, whose low nibbles meet x's even columns and high
  nibbles x's odd columns (x loaded with stride 2): two dots per tile.
* nf4: same walk; the codes are gathered from the 16-entry code book, times the block's
  absmax per group. The float32 code values are not exact in fp16/bf16, so for half x each
  one is split as hi + lo (hi = code rounded to x's dtype, lo = the remainder, rounded) and
  both halves are dotted: four dots per tile instead of two, and the weight stays as exact as
  the fp32 path's to ~2^-22 (fp16) / ~2^-16 (bf16) relative.

x: float32, float16 or bfloat16, any strides; the weight tensors are made contiguous. The
4-bit launchers need the group to be a multiple of 32 (the smallest K tile, 16 bytes a row);
`supports` says which inputs the launchers take and the ops fall back to torch otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from effc.kernels.quant import _NF4_VALUES
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BK_PACKED = 32  # 4-bit K tile: BK / 2 = 16 packed bytes, the smallest tl.dot depth
MAX_BK = 64


# ----------------------------------------------------------------------------- support


def supports(x: Tensor, qweight: Tensor, group: Optional[int] = None) -> bool:
    """Whether the launchers take x against this packed weight: x float32/float16/bfloat16,
    non-empty, on qweight's device; int8 (group None): qweight (out, in) with in = x's last
    dim; int4/nf4 (group given): qweight (out, in // 2) with in = x's last dim, group a
    multiple of 32 dividing in."""
    if x.dtype not in DTYPES or x.dim() < 1 or x.numel() == 0 or qweight.dim() != 2:
        return False
    if qweight.numel() == 0 or qweight.device != x.device:
        return False
    K = x.shape[-1]
    if group is None:
        return qweight.dtype == torch.int8 and qweight.shape[1] == K
    return (qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == K and group > 0
            and group % MIN_BK_PACKED == 0 and K % group == 0)


# ----------------------------------------------------------------------------- tiles


def _tiles(N: int, OUT: int, K: int, group: Optional[int],
           blocks: Optional[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(BM, BN, BK): BM, BN in 16..64 by the problem's size (narrow BN at decode sizes so
    that more programs share the weight's columns), BK 64, or for 4-bit the largest power of
    two <= 64 dividing the group. `blocks` overrides (tests, tuning), checked."""
    if blocks is None:
        BM = min(64, max(16, triton.next_power_of_2(N)))
        BN = min(32 if N <= 16 else 64, max(16, triton.next_power_of_2(OUT)))
        if group is None:
            BK = min(MAX_BK, max(16, triton.next_power_of_2(K)))
        else:
            BK = MIN_BK_PACKED
            while BK * 2 <= MAX_BK and group % (BK * 2) == 0:
                BK *= 2
    else:
        BM, BN, BK = blocks
    for b in (BM, BN, BK):
        if b < 16 or b & (b - 1):
            raise ValueError(f"tile sizes must be powers of two >= 16, got {(BM, BN, BK)}")
    if group is not None and (BK < MIN_BK_PACKED or group % BK):
        raise ValueError(f"4-bit K tile {BK} must be >= {MIN_BK_PACKED} and divide group {group}")
    return BM, BN, BK


def _precision(x: Tensor) -> str:
    # fp32 operands: IEEE fp32 products, no TF32; half operands ignore it ("tf32" is the
    # CUDA default and never changes a half dot)
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _check_x(x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, K), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {DTYPES}")


def _bias(bias: Optional[Tensor], OUT: int, dummy: Tensor) -> Tensor:
    """bias made contiguous, or a dummy pointer when there is none (HAS_BIAS=False)."""
    if bias is None:
        return dummy
    if bias.numel() != OUT:
        raise ValueError(f"bias has {bias.numel()} values for {OUT} outputs")
    return bias.contiguous()


_CODE_CACHE: dict = {}


def _nf4_tables(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(hi, lo) code books in `dtype`: hi = NF4 rounded to dtype, lo = the float32
    remainder rounded to dtype (all zero, and unused, for float32)."""
    key = (str(device), dtype)
    if key not in _CODE_CACHE:
        code = torch.tensor(_NF4_VALUES, dtype=torch.float32, device=device)
        hi = code.to(dtype)
        lo = (code - hi.float()).to(dtype)
        _CODE_CACHE[key] = (hi, lo)
    return _CODE_CACHE[key]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _int8_kernel(X, Q, S, B, Y, N, K, OUT, sxm, sxk, sym, syn,
                 HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < N
    mn = rn < OUT
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        mk = kk < K
        x = tl.load(X + rm64[:, None] * sxm + kk[None, :] * sxk,
                    mask=mm[:, None] & mk[None, :], other=0.0)
        q = tl.load(Q + rn64[None, :] * K + kk[:, None],
                    mask=mk[:, None] & mn[None, :], other=0)  # (BK, BN): W^T's tile
        acc = tl.dot(x, q.to(x.dtype), acc, input_precision=PREC)
    s = tl.load(S + rn, mask=mn, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm64[:, None] * sym + rn64[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _packed4_kernel(X, Q, S, Z, CH, CL, B, Y, N, K, OUT, GROUP, sxm, sxk, sym, syn,
                    NF4: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """int4 (NF4=False: w = (q - Z) * S) or nf4 (NF4=True: w = CH[q] (+ CL[q]) * S), per
    group of GROUP columns; BK divides GROUP, GROUP divides K."""
    HK: tl.constexpr = BK // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < N
    mn = rn < OUT
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rh = tl.arange(0, HK)
    KH = K // 2
    NG = K // GROUP
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(NG):
        s = tl.load(S + rn64 * NG + g, mask=mn, other=0.0).to(tl.float32)
        if not NF4:
            z = tl.load(Z + rn64 * NG + g, mask=mn, other=0).to(tl.int32)
        part = tl.zeros((BM, BN), dtype=tl.float32)
        for kt in range(0, GROUP, BK):
            k0 = g * GROUP + kt
            # x's even columns k0, k0 + 2, ... and odd columns k0 + 1, k0 + 3, ...: (BM, HK)
            xp = X + rm64[:, None] * sxm + (k0 + 2 * rh)[None, :] * sxk
            xe = tl.load(xp, mask=mm[:, None], other=0.0)
            xo = tl.load(xp + sxk, mask=mm[:, None], other=0.0)
            # bytes k0 / 2 .. k0 / 2 + HK - 1 of rows rn, as W^T's (HK, BN) tile
            p = tl.load(Q + rn64[None, :] * KH + (k0 // 2 + rh)[:, None], mask=mn[None, :], other=0)
            lo = (p & 0xF).to(tl.int32)
            hi = (p >> 4).to(tl.int32)
            if NF4:
                part = tl.dot(xe, tl.load(CH + lo), part, input_precision=PREC)
                part = tl.dot(xo, tl.load(CH + hi), part, input_precision=PREC)
                if SPLIT:
                    part = tl.dot(xe, tl.load(CL + lo), part, input_precision=PREC)
                    part = tl.dot(xo, tl.load(CL + hi), part, input_precision=PREC)
            else:
                part = tl.dot(xe, (lo - z[None, :]).to(xe.dtype), part, input_precision=PREC)
                part = tl.dot(xo, (hi - z[None, :]).to(xo.dtype), part, input_precision=PREC)
        acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm64[:, None] * sym + rn64[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


# ----------------------------------------------------------------------------- launchers


def int8_mm(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor] = None, *,
            blocks: Optional[tuple[int, int, int]] = None) -> Tensor:
    """x (N, K) @ (qweight * scale[:, None]).T (+ bias) -> (N, out) in x's dtype.
    qweight int8 (out, K), scale (out,), bias (out,) or None."""
    _check_x(x)
    N, K = x.shape
    OUT = qweight.shape[0]
    if qweight.shape != (OUT, K) or scale.numel() != OUT:
        raise ValueError(f"int8 weight {tuple(qweight.shape)} / scale {tuple(scale.shape)} "
                         f"do not match x {tuple(x.shape)}")
    BM, BN, BK = _tiles(N, OUT, K, None, blocks)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    y = torch.empty((N, OUT), dtype=x.dtype, device=x.device)
    b = _bias(bias, OUT, scale)
    grid = (triton.cdiv(N, BM), triton.cdiv(OUT, BN))
    _int8_kernel[grid](x, qweight, scale, b, y, N, K, OUT, x.stride(0), x.stride(1),
                       y.stride(0), y.stride(1), HAS_BIAS=bias is not None,
                       PREC=_precision(x), BM=BM, BN=BN, BK=BK)
    return y


def _packed4_launch(x, qweight, scale, zero, group, bias, nf4, blocks):
    _check_x(x)
    N, K = x.shape
    OUT = qweight.shape[0]
    if qweight.shape != (OUT, K // 2) or K % 2 or group <= 0 or K % group:
        raise ValueError(f"4-bit weight {tuple(qweight.shape)} with group {group} does not "
                         f"match x {tuple(x.shape)}")
    if scale.shape != (OUT, K // group) or (zero is not None and zero.shape != scale.shape):
        raise ValueError(f"per-group tensors must be ({OUT}, {K // group}), got {tuple(scale.shape)}")
    BM, BN, BK = _tiles(N, OUT, K, group, blocks)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    zero = zero.contiguous() if zero is not None else scale
    if nf4:
        code_hi, code_lo = _nf4_tables(x.device, x.dtype)
    else:
        code_hi = code_lo = scale
    y = torch.empty((N, OUT), dtype=x.dtype, device=x.device)
    b = _bias(bias, OUT, scale)
    grid = (triton.cdiv(N, BM), triton.cdiv(OUT, BN))
    _packed4_kernel[grid](x, qweight, scale, zero, code_hi, code_lo, b, y, N, K, OUT, group,
                          x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                          NF4=nf4, SPLIT=nf4 and x.dtype != torch.float32,
                          HAS_BIAS=bias is not None, PREC=_precision(x), BM=BM, BN=BN, BK=BK)
    return y


def int4_mm(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, group: int,
            bias: Optional[Tensor] = None, *,
            blocks: Optional[tuple[int, int, int]] = None) -> Tensor:
    """x (N, K) @ dequantize_int4(qweight, scale, zero, group).T (+ bias) -> (N, out) in x's
    dtype. qweight uint8 (out, K // 2), scale float (out, K // group), zero uint8 (same)."""
    return _packed4_launch(x, qweight, scale, zero, group, bias, False, blocks)


def nf4_mm(x: Tensor, qweight: Tensor, absmax: Tensor, group: int,
           bias: Optional[Tensor] = None, *,
           blocks: Optional[tuple[int, int, int]] = None) -> Tensor:
    """x (N, K) @ dequantize_nf4(qweight, group, absmax).T (+ bias) -> (N, out) in x's
    dtype. qweight uint8 (out, K // 2), absmax float (out, K // group)."""
    return _packed4_launch(x, qweight, absmax, None, group, bias, True, blocks)
