"""The quantized matmuls' Triton launchers against the torch dequantization of
effc.kernels.quant: y = F.linear(x.float(), dequantize_*(...), bias), on weights made by
that module's quantizers.

Weights are randn / sqrt(K), so y is O(1) and no atol is widened on the small shapes: fp16
x and the codes (int8 q, int4 q - zero, NF4 split hi + lo) are exact in the kernel's dot,
leaving fp32 summation order (~sqrt(K) * 2^-24 here, far below 1e-5) and, for fp16, the
output's rounding (<= 2^-11 |y|, inside rtol).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from effc.kernels.quant import (
    dequantize_int4,
    dequantize_int8,
    dequantize_nf4,
    quantize_int4_rtn,
    quantize_int8,
    quantize_nf4,
)

T = pytest.importorskip("effc.kernels.triton.quant")
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

DTYPES = [torch.float32, torch.float16]
NS = [1, 5, 17]
OUTS = [3, 19]


def make(N, K, OUT, dtype, device, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, K, generator=gen) / math.sqrt(K)
    x = torch.randn(N, K, generator=gen).to(device, dtype)
    b = torch.randn(OUT, generator=gen).to(device, dtype) if bias else None
    return w, x, b


def reference(x, W, b):
    return F.linear(x.float(), W.float(), None if b is None else b.float())


def to(d, device):
    return {k: v.to(device) for k, v in d.items()}


# ----------------------------------------------------------------------------- int8


@pytest.mark.parametrize("K,blocks", [(33, None), (33, (16, 16, 16)), (64, None), (128, (16, 16, 32))])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("OUT", OUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_mm(K, blocks, N, OUT, dtype, bias, device, close):
    w, x, b = make(N, K, OUT, dtype, device, bias)
    p = to(quantize_int8(w), device)
    y = T.int8_mm(x, p["qweight"], p["scale"], b, blocks=blocks)
    assert y.dtype == dtype and y.shape == (N, OUT)
    close(y, reference(x, dequantize_int8(**p), b), dtype)


# ----------------------------------------------------------------------------- int4 / nf4

PACKED = [  # (K, group, blocks): one or several groups, one or several K tiles per group
    (64, 32, None),
    (128, 64, None),
    (128, 64, (16, 16, 32)),
    (128, 32, (32, 16, 32)),
]


@pytest.mark.parametrize("K,group,blocks", PACKED)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("OUT", OUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_int4_mm(K, group, blocks, N, OUT, dtype, bias, device, close):
    w, x, b = make(N, K, OUT, dtype, device, bias)
    p = to(quantize_int4_rtn(w, group), device)
    y = T.int4_mm(x, p["qweight"], p["scale"], p["zero"], group, b, blocks=blocks)
    assert y.dtype == dtype and y.shape == (N, OUT)
    close(y, reference(x, dequantize_int4(p["qweight"], p["scale"], p["zero"], group), b), dtype)


@pytest.mark.parametrize("K,group,blocks", PACKED)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("OUT", OUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_mm(K, group, blocks, N, OUT, dtype, bias, device, close):
    w, x, b = make(N, K, OUT, dtype, device, bias)
    p = to(quantize_nf4(w, group), device)
    y = T.nf4_mm(x, p["qweight"], p["absmax"], group, b, blocks=blocks)
    assert y.dtype == dtype and y.shape == (N, OUT)
    close(y, reference(x, dequantize_nf4(p["qweight"], group, p["absmax"]), b), dtype)


def test_nf4_half_keeps_the_fp32_code_book(device):
    """fp16 x: the kernel's NF4 weights are the fp32 code values (hi + lo split), not the
    codes rounded to fp16. x is one-hot, so y[i, r] is exactly one dequantized weight, which
    fp16 output rounding then keeps to 2^-11 relative; a code rounded to fp16 alone would
    already be off by up to 2^-12 before that (checked below on the tables)."""
    K, OUT, group = 64, 16, 32
    w, _, _ = make(1, K, OUT, torch.float32, "cpu", False, seed=3)
    p = to(quantize_nf4(w, group), device)
    W = dequantize_nf4(p["qweight"], group, p["absmax"])
    x = torch.eye(K, dtype=torch.float16, device=device)
    y = T.nf4_mm(x, p["qweight"], p["absmax"], group)
    want = W.T
    torch.testing.assert_close(y, want.to(torch.float16), rtol=0, atol=0)
    hi, lo = T._nf4_tables(torch.device(device), torch.float16)
    code = torch.tensor(T._NF4_VALUES, dtype=torch.float64)
    assert (hi.double() + lo.double() - code).abs().max() < 2.0 ** -22
    assert (hi.double() - code).abs().max() > 2.0 ** -16  # the split is not a no-op


# ----------------------------------------------------------------------------- layouts, support


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_x(dtype, device, close):
    """x a non-contiguous view: column stride 2, and a transposed (column-major) x."""
    K, OUT, N, group = 64, 19, 5, 32
    w, xw, b = make(2 * N, 2 * K, OUT, dtype, device, True)
    w = w[:, :K]
    x = xw[:N, ::2]
    assert not x.is_contiguous()
    xt = xw[:, :K].t().contiguous().t()[:N]  # column-major storage
    p8, p4, pn = (to(quantize_int8(w), device), to(quantize_int4_rtn(w, group), device),
                  to(quantize_nf4(w, group), device))
    for xx in (x, xt):
        close(T.int8_mm(xx, p8["qweight"], p8["scale"], b), reference(xx, dequantize_int8(**p8), b), dtype)
        close(T.int4_mm(xx, p4["qweight"], p4["scale"], p4["zero"], group, b),
              reference(xx, dequantize_int4(p4["qweight"], p4["scale"], p4["zero"], group), b), dtype)
        close(T.nf4_mm(xx, pn["qweight"], pn["absmax"], group, b),
              reference(xx, dequantize_nf4(pn["qweight"], group, pn["absmax"]), b), dtype)


def test_supports(device):
    K, OUT = 64, 3
    w = torch.randn(OUT, K)
    q8 = quantize_int8(w)["qweight"].to(device)
    q4 = quantize_int4_rtn(w, 32)["qweight"].to(device)
    x = torch.randn(5, K, device=device)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert T.supports(x.to(dt), q8) and T.supports(x.to(dt), q4, 32)
        assert T.supports(x.to(dt), q4, 64)
    assert T.supports(x.reshape(5, 1, K), q8)  # leading dims: the op flattens them
    assert not T.supports(x.double(), q8) and not T.supports(x.double(), q4, 32)
    assert not T.supports(x[:0], q8) and not T.supports(x[:0], q4, 32)
    assert not T.supports(x[:, :33], q8)  # K mismatch
    assert not T.supports(x, q4, 16)  # group below the smallest 4-bit K tile
    assert not T.supports(x.repeat(1, 3), quantize_int4_rtn(w.repeat(1, 3), 48)["qweight"].to(device), 48)
    assert not T.supports(x, q4, 128)  # group does not divide K
    assert not T.supports(x, q4)  # packed weight, int8 kernel
    assert not T.supports(x, q8, 32)  # int8 weight, 4-bit kernel


def test_bad_tiles_raise(device):
    K, OUT, group = 64, 3, 32
    w, x, _ = make(2, K, OUT, torch.float32, device, False)
    p = to(quantize_int4_rtn(w, group), device)
    with pytest.raises(ValueError):
        T.int4_mm(x, p["qweight"], p["scale"], p["zero"], group, blocks=(16, 16, 64))  # BK > group
    with pytest.raises(ValueError):
        T.int4_mm(x, p["qweight"], p["scale"], p["zero"], group, blocks=(16, 16, 16))  # BK < 32
    with pytest.raises(ValueError):
        T.int8_mm(x, *to(quantize_int8(w), device).values(), blocks=(16, 24, 16))  # not a power of 2


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.skipif(not CUDA, reason="large shapes and bf16 need a CUDA GPU (slow or wrong in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [1, 300, 2048])
def test_quant_large_on_gpu(dtype, N, close):
    """Launchers and the effc:: ops' CUDA kernels (3-D x, backward) on a 4096 x 4096 weight.
    The reference is float64 (TF32 settings cannot reach it); the fp32 kernel's summation
    error grows like sqrt(K), so atol is widened by sqrt(K / 128) (the small tests' K)."""
    K, OUT, group = 4096, 4096, 128
    scale = math.sqrt(K / 128)
    w, x, b = make(N, K, OUT, dtype, "cuda", True)
    ref = lambda W: F.linear(x.double(), W.double(), b.double())
    p8 = to(quantize_int8(w), "cuda")
    p4 = to(quantize_int4_rtn(w, group), "cuda")
    pn = to(quantize_nf4(w, group), "cuda")
    W8 = dequantize_int8(**p8)
    W4 = dequantize_int4(p4["qweight"], p4["scale"], p4["zero"], group)
    Wn = dequantize_nf4(pn["qweight"], group, pn["absmax"])
    close(T.int8_mm(x, p8["qweight"], p8["scale"], b), ref(W8), dtype, scale)
    close(T.int4_mm(x, p4["qweight"], p4["scale"], p4["zero"], group, b), ref(W4), dtype, scale)
    close(T.nf4_mm(x, pn["qweight"], pn["absmax"], group, b), ref(Wn), dtype, scale)

    x3 = x.reshape(1, N, K).requires_grad_()
    for y, W in ((torch.ops.effc.int8_linear(x3, p8["qweight"], p8["scale"], b), W8),
                 (torch.ops.effc.int4_linear(x3, p4["qweight"], p4["scale"], p4["zero"], group, b), W4),
                 (torch.ops.effc.nf4_linear(x3, pn["qweight"], pn["absmax"], group, b), Wn)):
        assert y.shape == (1, N, OUT) and y.dtype == dtype
        close(y[0], ref(W), dtype, scale)
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x3, g)
        close(gx[0], g[0].double() @ W.double(), dtype, scale)
