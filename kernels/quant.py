"""Weight quantization: int8, int4 (round-to-nearest and GPTQ), NF4, LSQ fake quantization,
and the linear ops that run on the stored formats.

Canonical storage of one linear weight W (out, in), float32. A quantized linear at path P
replaces `P.weight` by the tensors below (names are suffixes of P):

* int8 -- per output row, symmetric, round to nearest.
  `P.qweight` int8 (out, in), `P.scale` float32 (out,).
  scale[r] = max|W[r, :]| / 127, and 1.0 for an all-zero row;
  qweight = clamp(round(W / scale), -127, 127) with torch.round (ties to even);
  W[r, c] ~= qweight[r, c] * scale[r].
* int4 -- asymmetric min-max over groups of g consecutive input columns (GPTQ's convention).
  `P.qweight` uint8 (out, in // 2): byte j of a row holds column 2j in its low nibble and
  column 2j + 1 in its high nibble, each nibble a code q in [0, 15];
  `P.scale` float32 (out, in // g); `P.zero` uint8 (out, in // g), integer zero point in [0, 15].
  W[r, c] ~= (q[r, c] - zero[r, c // g]) * scale[r, c // g].
  Round to nearest (RTN), per group: lo = min(min(w), 0), hi = max(max(w), 0),
  scale = (hi - lo) / 15 (1.0 for an all-zero group), zero = clamp(round(-lo / scale), 0, 15),
  q = clamp(round(w / scale) + zero, 0, 15). Needs in % g == 0 and g even (the language allows
  g in 32..256; these functions take any even g).
* nf4 -- QLoRA's NormalFloat4 (Dettmers et al. 2023, arXiv:2305.14314) over blocks of g
  consecutive input columns. `P.qweight` uint8 (out, in // 2), same nibble order, each nibble
  an index into the 16-value code book `NF4_CODE`; absmax = max|w| of the block (1.0 for an
  all-zero block), q = index of the code nearest to w / absmax; W[r, c] ~= NF4[q] * absmax.
  Plain: `P.absmax` float32 (out, in // g).
  Double quantization (QLoRA's, here with an int8 second level): the out * in // g absmax
  values, flattened row-major, minus their mean, a = absmax - mean, are quantized in blocks of
  256 consecutive values: `P.absmax_scale` float32 (ceil(out * in // g / 256),) = max|a| / 127
  per block (0 -> 1.0), `P.absmax_q` int8 (out, in // g) = clamp(round(a / scale), -127, 127),
  `P.absmax_mean` float32 (1,); absmax ~= absmax_q * absmax_scale[block] + mean.

Bytes per weight: int8 1 + 4/in; int4 0.5 + 5/g; nf4 0.5 + 4/g (0.5 + 1/g + 4/(256 g) with
double quantization).

Also here: GPTQ (Frantar et al. 2022, arXiv:2210.17323), which fills the int4 format from a
calibration Hessian, LSQ fake quantization for quantization-aware training (Esser et al. 2019,
arXiv:1902.08153), and the `effc::{int8,int4,nf4}_linear` custom ops, y = x @ dequant(W).T + b,
whose backward gives grad_x and grad_bias only (the quantized tensors stay frozen, as under
QLoRA adapters). The ops dequantize and call one float matmul. aten's packed CPU kernels
(`_weight_int8pack_mm`; `_weight_int4pack_mm_for_cpu` on `_convert_weight_to_int4pack_for_cpu`
of int32 codes, scales_and_zeros = [scale, (8 - zero) * scale] since (q - z) s = (q - 8) s +
(8 - z) s) reproduce our formats, but on torch 2.13's CPU build, 2048 tokens x a 2048x2048
weight, they are slower: bf16 x ~2x (int4 396 vs 202 ms, int8 374 vs 190 ms, 1 thread), fp32 x
40-85x (int4 16.8 s vs 0.21 s); they also want scales in x's dtype (bf16 scales are not our
fp32 format, ~0.3% relative error), out % 16 == 0, g in {32, 64, 128, 256} and 2-D x. They
win only for bf16 x at decode sizes (1-16 tokens, 3-12x), so no repacked path is provided.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from effc.kernels import math_dtype

# ----------------------------------------------------------------------------- packing


def pack_int4(q_OI: Tensor) -> Tensor:
    """uint8 codes in [0, 15] (out, in) -> uint8 (out, in // 2); column 2j low, 2j + 1 high."""
    if q_OI.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q_OI.shape[-1]}")
    q_OI = q_OI.to(torch.uint8)
    return q_OI[:, 0::2] | (q_OI[:, 1::2] << 4)


def unpack_int4(packed_OH: Tensor) -> Tensor:
    """uint8 (out, in // 2) -> uint8 codes (out, in)."""
    lo, hi = packed_OH & 0xF, packed_OH >> 4
    return torch.stack((lo, hi), dim=-1).reshape(packed_OH.shape[0], -1)


def _groups(t_OI: Tensor, group: int, even: bool = True) -> Tensor:
    """(out, in) -> (out, in // group, group) view. Packed formats need an even group (two
    codes a byte); LSQ's fake quantization takes any group that divides in."""
    out, inp = t_OI.shape
    if group <= 0 or inp % group or (even and group % 2):
        need = "divide in_features" + (" and be even" if even else "")
        raise ValueError(f"group {group} must {need} ({inp})")
    return t_OI.reshape(out, inp // group, group)


# ----------------------------------------------------------------------------- int8


def quantize_int8(w: Tensor) -> dict:
    w = w.detach().float()
    absmax_O = w.abs().amax(dim=1)
    scale_O = torch.where(absmax_O == 0, 1.0, absmax_O / 127)
    q = torch.round(w / scale_O[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"qweight": q, "scale": scale_O}


def dequantize_int8(qweight: Tensor, scale: Tensor) -> Tensor:
    return qweight.float() * scale.float()[:, None]


# ----------------------------------------------------------------------------- int4


def _rtn_params(w_OG: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row min-max (scale, zero) of a (..., g) slab, both float32 (zero holds integers).
    The range always includes 0 so that 0 is exactly representable (padding, pruned weights)."""
    lo = w_OG.amin(dim=-1).clamp(max=0)
    hi = w_OG.amax(dim=-1).clamp(min=0)
    scale = (hi - lo) / 15
    scale = torch.where(scale == 0, 1.0, scale)  # hi == lo only for an all-zero group
    zero = torch.round(-lo / scale).clamp_(0, 15)
    return scale, zero


def _rtn_codes(w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (torch.round(w / scale) + zero).clamp_(0, 15)


def quantize_int4_rtn(w: Tensor, group: int) -> dict:
    w_OGg = _groups(w.detach().float(), group)
    scale_OG, zero_OG = _rtn_params(w_OGg)
    q = _rtn_codes(w_OGg, scale_OG[..., None], zero_OG[..., None]).reshape(w.shape)
    return {"qweight": pack_int4(q), "scale": scale_OG, "zero": zero_OG.to(torch.uint8)}


def dequantize_int4(qweight: Tensor, scale: Tensor, zero: Tensor, group: int) -> Tensor:
    q_OGg = _groups(unpack_int4(qweight).float(), group)
    w = (q_OGg - zero.float()[..., None]) * scale.float()[..., None]
    return w.reshape(qweight.shape[0], -1)


# ----------------------------------------------------------------------------- nf4

# The NF4 code book: Dettmers et al. 2023 (QLoRA), appendix E, the same float32 values as
# bitsandbytes' published NF4 table (create_normal_map). Asymmetric by construction: 8
# positive levels, 7 negative, and an exact 0.
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_CODE = torch.tensor(_NF4_VALUES, dtype=torch.float32)

_DQ_BLOCK = 256  # absmax values per second-level scale (QLoRA's double-quant block)


def _nf4_code(device) -> Tensor:
    # a fresh tensor from Python floats rather than NF4_CODE itself: under FakeTensorMode
    # (torch.compile, opcheck) this becomes a fake tensor, where a real module-level tensor
    # captured by the traced backward is rejected
    return torch.tensor(_NF4_VALUES, dtype=torch.float32, device=device)


def _nearest_nf4(x: Tensor) -> Tensor:
    """Index of the nearest NF4 code to each x in [-1, 1]; on an exact tie the lower index.
    Only the two codes that bracket x can be nearest, so this compares 2 distances per value
    instead of materializing 16 (argmin over a (..., 16) tensor is 16x the weight's memory)."""
    code = _nf4_code(x.device)
    hi = torch.searchsorted(code, x.contiguous()).clamp_(1, 15)  # code[hi-1] < x <= code[hi]
    lo = hi - 1
    take_hi = (x - code[hi]).abs() < (x - code[lo]).abs()
    return torch.where(take_hi, hi, lo).to(torch.uint8)


def _double_quant(absmax_OG: Tensor) -> dict:
    flat = absmax_OG.reshape(-1)
    mean = flat.mean()
    a = flat - mean
    nblk = math.ceil(a.numel() / _DQ_BLOCK)
    a_pad = torch.nn.functional.pad(a, (0, nblk * _DQ_BLOCK - a.numel())).view(nblk, _DQ_BLOCK)
    amax = a_pad.abs().amax(dim=1)  # zero padding never raises a block's max|a|
    scale_B = torch.where(amax == 0, 1.0, amax / 127)
    q = torch.round(a_pad / scale_B[:, None]).clamp_(-127, 127).reshape(-1)[: a.numel()]
    return {
        "absmax_q": q.to(torch.int8).view(absmax_OG.shape),
        "absmax_scale": scale_B,
        "absmax_mean": mean.reshape(1),
    }


def nf4_absmax(absmax_q: Tensor, absmax_scale: Tensor, absmax_mean: Tensor) -> Tensor:
    """Decode double-quantized absmax -> float32 (out, in // g)."""
    n = absmax_q.numel()
    scale = absmax_scale.float().repeat_interleave(_DQ_BLOCK)[:n]
    return (absmax_q.reshape(-1).float() * scale + absmax_mean.float()).view(absmax_q.shape)


def quantize_nf4(w: Tensor, group: int, double_quant: bool = False) -> dict:
    w_OGg = _groups(w.detach().float(), group)
    absmax_OG = w_OGg.abs().amax(dim=-1)
    absmax_OG = torch.where(absmax_OG == 0, 1.0, absmax_OG)
    q = _nearest_nf4(w_OGg / absmax_OG[..., None]).reshape(w.shape)
    out = {"qweight": pack_int4(q)}
    out.update(_double_quant(absmax_OG) if double_quant else {"absmax": absmax_OG})
    return out


def dequantize_nf4(
    qweight: Tensor,
    group: int,
    absmax: Optional[Tensor] = None,
    absmax_q: Optional[Tensor] = None,
    absmax_scale: Optional[Tensor] = None,
    absmax_mean: Optional[Tensor] = None,
) -> Tensor:
    """Either `absmax`, or the three double-quant tensors; `dequantize_nf4(group=g,
    **quantize_nf4(w, g, dq))` works for both."""
    if absmax is None:
        if absmax_q is None or absmax_scale is None or absmax_mean is None:
            raise ValueError("dequantize_nf4 needs absmax or absmax_q/absmax_scale/absmax_mean")
        absmax = nf4_absmax(absmax_q, absmax_scale, absmax_mean)
    code = _nf4_code(qweight.device)
    v_OGg = _groups(code[unpack_int4(qweight).long()], group)
    return (v_OGg * absmax.float()[..., None]).reshape(qweight.shape[0], -1)


# ----------------------------------------------------------------------------- GPTQ


class HessianAccumulator:
    """H = (2 / n) sum_x x x^T over the n calibration rows seen by a linear layer.

    The running sum is float64: it adds up 1e5-1e6 outer products of activations whose
    channels differ by orders of magnitude, and GPTQ then takes a Cholesky factor of its
    inverse, which fails or loses accuracy in float32 when H is ill-conditioned (the usual
    reason for GPTQ's "not positive definite" failures). The cost is in^2 * 8 bytes
    (128 MiB at in = 4096), held for one layer at a time.
    """

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        x_NI = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(x_NI.T, x_NI)
        self.n += x_NI.shape[0]

    @property
    def H(self) -> Tensor:
        if self.n == 0:
            raise ValueError("HessianAccumulator.H before any input was added")
        return self.sum * (2.0 / self.n)


def _inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, float64: row j of U,
    divided by U[j, j], is how quantizing column j feeds its error to the columns after it."""
    H = H.to(torch.float64).clone()
    diag = H.diagonal()
    diag.add_(damp * diag.mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item():
        raise ValueError(f"GPTQ: Hessian is not positive definite after damping {damp}; raise damp")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


@torch.no_grad()
def gptq_int4(w: Tensor, H: Tensor, group: int, damp: float = 0.01, block: int = 128) -> dict:
    """GPTQ (arXiv:2210.17323, Algorithm 1) to the int4 format, without act-order.

    Columns are quantized left to right; each one's error, scaled by the inverse-Hessian
    Cholesky row, is subtracted from the columns not yet quantized, within the current block
    at once and from later columns lazily, one matmul per block. A group's scale/zero are the
    RTN formula on the group's weights as they stand when its first column comes up, i.e.
    after every error update from earlier columns. Blocks are whole groups (block rounded
    down to a multiple of group, at least one group) so that those weights are always fully
    updated when read; the block size changes only speed and float round-off, not the math.
    """
    W = w.detach().float().clone()
    out, inp = W.shape
    _groups(W, group)  # validates group
    H = H.detach().to(device=W.device, dtype=torch.float64).clone()
    # A column no calibration input ever touched (diag 0) cannot affect the output: GPTQ pins
    # its weights to 0 and its Hessian diagonal to 1 so the factorization exists (before the
    # damping, whose mean(diag H) therefore counts those 1s, as in GPTQ).
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_hessian_factor(H, damp).float()

    block = max(block // group, 1) * group
    Q = torch.empty_like(W)
    scale = torch.empty(out, inp // group, dtype=torch.float32, device=W.device)
    zero = torch.empty_like(scale)
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]  # W1 is a view: updates land in W
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                s, z = _rtn_params(W1[:, i : i + group])
                scale[:, col // group], zero[:, col // group] = s, z
            s, z = scale[:, col // group], zero[:, col // group]
            w_col = W1[:, i]
            q = _rtn_codes(w_col, s, z)
            Q[:, col] = q
            err = (w_col - (q - z) * s) / U1[i, i]
            W1[:, i + 1 :] -= err[:, None] * U1[i, i + 1 :][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return {"qweight": pack_int4(Q), "scale": scale, "zero": zero.to(torch.uint8)}


# ----------------------------------------------------------------------------- LSQ


def _lsq_range(bits: int) -> tuple[int, int]:
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1  # (Qn, Qp): signed, e.g. [-8, 7] at 4 bits


class _LSQ(torch.autograd.Function):
    """LSQ: w_q = clamp(round(w / s), -Qn, Qp) * s, one step s per (row, group).
    Gradients (paper eqs. 3 and 5): straight-through for w strictly inside the range, 0
    outside; for s, -v + round(v) inside (v = w / s), -Qn below, Qp above, summed over the
    group and scaled by g = 1 / sqrt(group * Qp)."""

    @staticmethod
    def forward(ctx, w, step, bits, group):
        qn, qp = _lsq_range(bits)
        w_OGg = _groups(w, group, even=False)
        v = w_OGg / step[..., None]
        ctx.save_for_backward(w, step)
        ctx.bits, ctx.group = bits, group
        return (torch.round(v).clamp_(-qn, qp) * step[..., None]).reshape(w.shape)

    @staticmethod
    def backward(ctx, grad):
        w, step = ctx.saved_tensors
        qn, qp = _lsq_range(ctx.bits)
        v = _groups(w, ctx.group, even=False) / step[..., None]
        below, above = v <= -qn, v >= qp
        inside = ~(below | above)
        g_OGg = _groups(grad, ctx.group, even=False)
        gw = gs = None
        if ctx.needs_input_grad[0]:
            gw = (g_OGg * inside).reshape(w.shape)
        if ctx.needs_input_grad[1]:
            dq_ds = torch.where(below, -qn, torch.where(above, qp, torch.round(v) - v))
            gs = (g_OGg * dq_ds).sum(-1) / math.sqrt(ctx.group * qp)
        return gw, gs, None, None


def fake_quant_lsq(w: Tensor, step: Tensor, bits: int, group: int) -> Tensor:
    """w (out, in), step (out, in // group) > 0 -> fake-quantized w, differentiable in both."""
    return _LSQ.apply(w, step, bits, group)


def lsq_init_step(w: Tensor, bits: int, group: int) -> Tensor:
    """LSQ's initial step, 2 * mean|w| / sqrt(Qp), per (row, group)."""
    _, qp = _lsq_range(bits)
    mean_abs = _groups(w.detach(), group, even=False).abs().mean(-1)
    return (2 * mean_abs / math.sqrt(qp)).contiguous()


# ----------------------------------------------------------------------------- linear ops
#
# Each op dequantizes W in float32 (float64 for float64 x, so gradcheck stays meaningful)
# and multiplies; the output has x's dtype. Backward: grad_x = grad @ W, grad_b = sum(grad);
# the quantized tensors get none.


def _compute_dtype(x: Tensor) -> torch.dtype:
    return math_dtype(x.dtype)


def _linear(x: Tensor, W_OI: Tensor, bias: Optional[Tensor]) -> Tensor:
    ct = _compute_dtype(x)
    y = x.to(ct) @ W_OI.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def _linear_fake(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _linear_backward(ctx, grad: Tensor, W_OI: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad_x, grad_bias); x is input 0 and bias the last input of every op."""
    gx = gb = None
    if ctx.needs_input_grad[0]:
        ct = _compute_dtype(grad)
        gx = (grad.to(ct) @ W_OI.to(ct)).to(ctx.x_dtype)
    if ctx.b_dtype is not None and ctx.needs_input_grad[-1]:
        gb = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.b_dtype)
    return gx, gb


def _save_linear_ctx(ctx, x: Tensor, bias: Optional[Tensor]) -> None:
    ctx.x_dtype = x.dtype
    ctx.b_dtype = bias.dtype if bias is not None else None


@torch.library.custom_op(
    "effc::int8_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scale, Tensor? bias) -> Tensor",
)
def _int8_linear(x, qweight, scale, bias):
    return _linear(x, dequantize_int8(qweight, scale), bias)


@_int8_linear.register_fake
def _(x, qweight, scale, bias):
    return _linear_fake(x, qweight.shape[0])


def _int8_setup(ctx, inputs, output):
    x, qweight, scale, bias = inputs
    ctx.save_for_backward(qweight, scale)
    _save_linear_ctx(ctx, x, bias)


def _int8_backward(ctx, grad):
    qweight, scale = ctx.saved_tensors
    gx, gb = _linear_backward(ctx, grad, dequantize_int8(qweight, scale))
    return gx, None, None, gb


_int8_linear.register_autograd(_int8_backward, setup_context=_int8_setup)


@torch.library.custom_op(
    "effc::int4_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor scale, Tensor zero, int group, Tensor? bias)"
    " -> Tensor",
)
def _int4_linear(x, qweight, scale, zero, group, bias):
    return _linear(x, dequantize_int4(qweight, scale, zero, group), bias)


@_int4_linear.register_fake
def _(x, qweight, scale, zero, group, bias):
    return _linear_fake(x, qweight.shape[0])


def _int4_setup(ctx, inputs, output):
    x, qweight, scale, zero, group, bias = inputs
    ctx.save_for_backward(qweight, scale, zero)
    ctx.group = group
    _save_linear_ctx(ctx, x, bias)


def _int4_backward(ctx, grad):
    qweight, scale, zero = ctx.saved_tensors
    gx, gb = _linear_backward(ctx, grad, dequantize_int4(qweight, scale, zero, ctx.group))
    return gx, None, None, None, None, gb


_int4_linear.register_autograd(_int4_backward, setup_context=_int4_setup)


@torch.library.custom_op(
    "effc::nf4_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor qweight, Tensor absmax, int group, Tensor? bias) -> Tensor",
)
def _nf4_linear(x, qweight, absmax, group, bias):
    return _linear(x, dequantize_nf4(qweight, group, absmax), bias)


@_nf4_linear.register_fake
def _(x, qweight, absmax, group, bias):
    return _linear_fake(x, qweight.shape[0])


def _nf4_setup(ctx, inputs, output):
    x, qweight, absmax, group, bias = inputs
    ctx.save_for_backward(qweight, absmax)
    ctx.group = group
    _save_linear_ctx(ctx, x, bias)


def _nf4_backward(ctx, grad):
    qweight, absmax = ctx.saved_tensors
    gx, gb = _linear_backward(ctx, grad, dequantize_nf4(qweight, ctx.group, absmax))
    return gx, None, None, None, gb


_nf4_linear.register_autograd(_nf4_backward, setup_context=_nf4_setup)


def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return torch.ops.effc.int8_linear(x, qweight, scale, bias)


def int4_linear(
    x: Tensor,
    qweight: Tensor,
    scale: Tensor,
    zero: Tensor,
    group: int,
    bias: Optional[Tensor] = None,
) -> Tensor:
    return torch.ops.effc.int4_linear(x, qweight, scale, zero, group, bias)


def nf4_linear(
    x: Tensor, qweight: Tensor, absmax: Tensor, group: int, bias: Optional[Tensor] = None
) -> Tensor:
    return torch.ops.effc.nf4_linear(x, qweight, absmax, group, bias)


def dequantize(scheme: str, packed: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """The float32 weight of one quantized linear from its packed tensors by leaf name
    (`qweight`, `scale`, `zero`, `absmax`, ...), for scheme "int8" | "int4" | "nf4"."""
    if scheme == "int8":
        return dequantize_int8(packed["qweight"], packed["scale"])
    if scheme == "int4":
        return dequantize_int4(packed["qweight"], packed["scale"], packed["zero"], group)
    if scheme == "nf4":
        return dequantize_nf4(group=group, **packed)
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def packed_linear(x: torch.Tensor, scheme: str, group: int, double_quant: bool, packed: tuple,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ dequant(W).T (+ bias) for a weight in `scheme`'s packed tensors, in the order of
    effc.compiler.ir.packed_params (int8: qweight, scale; int4: qweight, scale, zero; nf4:
    qweight, absmax, or with double quantization qweight, absmax_q, absmax_scale,
    absmax_mean): the call the fx graph and the KV-cache decoder make."""
    if scheme == "int8":
        return int8_linear(x, *packed, bias)
    if scheme == "int4":
        return int4_linear(x, *packed, group, bias)
    absmax = nf4_absmax(*packed[1:]) if double_quant else packed[1]
    return nf4_linear(x, packed[0], absmax, group, bias)


# ----------------------------------------------------------------------------- CUDA kernels
#
# On CUDA the forward runs a Triton matmul that dequantizes in registers
# (`effc.kernels.triton.quant`), on x reshaped to 2-D; inputs it does not take (float64 x,
# a group not a multiple of 32, empty tensors) run the torch path above. The backward is
# unchanged: it dequantizes and multiplies.


def _cuda_2d(x: Tensor, out_features: int, mm) -> Tensor:
    return mm(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], out_features)


@_int8_linear.register_kernel("cuda")
def _(x, qweight, scale, bias):
    from effc.kernels.triton import quant as T

    if not T.supports(x, qweight):
        return _linear(x, dequantize_int8(qweight, scale), bias)
    return _cuda_2d(x, qweight.shape[0], lambda x2: T.int8_mm(x2, qweight, scale, bias))


@_int4_linear.register_kernel("cuda")
def _(x, qweight, scale, zero, group, bias):
    from effc.kernels.triton import quant as T

    if not T.supports(x, qweight, group):
        return _linear(x, dequantize_int4(qweight, scale, zero, group), bias)
    return _cuda_2d(x, qweight.shape[0],
                    lambda x2: T.int4_mm(x2, qweight, scale, zero, group, bias))


@_nf4_linear.register_kernel("cuda")
def _(x, qweight, absmax, group, bias):
    from effc.kernels.triton import quant as T

    if not T.supports(x, qweight, group):
        return _linear(x, dequantize_nf4(qweight, group, absmax), bias)
    return _cuda_2d(x, qweight.shape[0], lambda x2: T.nf4_mm(x2, qweight, absmax, group, bias))
