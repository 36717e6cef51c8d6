"""LoRA's Triton kernel (`mm_lowrank`) and launchers against float32 torch references,
forward and every gradient.

Inputs are scaled the way LoRA layers are (W and A by 1/sqrt(in), B by 1/sqrt(r)), so
every value is O(1) and `mm_lowrank` is held to CLOSE as is. The launchers, like any 16-bit
LoRA layer, keep two small intermediates in the input dtype: xa = xd A^T (the op's second
output, saved for backward) and scale * g B (N x r each). Their roundings (relative u
each, u = 2^-11 for float16) reach what they feed as an absolute error ~ u * m, m the RMS
of scale * xa (for y and grad B) or of scale * g B (grad x, grad xd, grad A), at least 1,
which the float32 reference does not make; and the gradients that are sums over the rows
(grad W, bias, A, B) grow, with their error, like sqrt(rows). So the launcher checks use
atol * m, times sqrt(rows) for the summed gradients (`widen`); CLOSE's atol is 4u, a
4u-per-unit margin over the expected error. For float32, m = 1.
"""

import math
import os

import pytest
import torch

from effc.kernels.lora import lora_linear_ref

T = pytest.importorskip("effc.kernels.triton.lora")
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

# (N, K, M, r): odd, below, at and above one 32-wide tile in every direction
MM_SHAPES = [(5, 7, 9, 1), (37, 33, 19, 4), (17, 16, 16, 2), (1, 31, 13, 3)]


def rand(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen) * std


@pytest.mark.parametrize("shape", MM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("w_transposed", [False, True])
def test_mm_lowrank(shape, dtype, has_bias, w_transposed, device, close):
    N, K, M, r = shape
    gen = torch.Generator().manual_seed(N * K + M + r)
    x = rand(gen, N, K).to(device, dtype)
    if w_transposed:  # W^T as a view of an (M, K) weight: strides (1, K)
        w = rand(gen, M, K, std=K ** -0.5).to(device, dtype).t()
        assert not w.is_contiguous()
    else:
        w = rand(gen, K, M, std=K ** -0.5).to(device, dtype)
    u = rand(gen, N, r).to(device, dtype)
    v = rand(gen, M, r, std=r ** -0.5).to(device, dtype).t()  # B^T-like view
    bias = rand(gen, M).to(device, dtype) if has_bias else None
    scale = 0.75
    y = T.mm_lowrank(x, w, u, v, scale, bias)
    want = x.float() @ w.float() + scale * (u.float() @ v.float())
    if has_bias:
        want = want + bias.float()
    assert y.dtype == dtype and y.shape == (N, M) and y.is_contiguous()
    close(y, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mm_lowrank_plain_and_strided_x(dtype, device, close):
    """No low-rank term (u None), and x given as a transposed view (as g^T in grad W)."""
    gen = torch.Generator().manual_seed(3)
    xt = rand(gen, 21, 11).to(device, dtype)  # x = xt^T, (11, 21), strides (1, 11)
    w = rand(gen, 21, 15, std=21 ** -0.5).to(device, dtype)
    y = T.mm_lowrank(xt.t(), w)
    close(y, xt.float().t() @ w.float(), dtype)


# (lead dims, in, out, r)
LORA_SHAPES = [((2, 5), 7, 9, 2), ((3, 11), 33, 19, 4), ((37,), 16, 13, 1)]


def make(shape, dtype, device, seed=0, has_bias=True, has_xd=False):
    lead, n_in, n_out, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = rand(gen, *lead, n_in).to(device, dtype)
    xd = (rand(gen, *lead, n_in) * 1.25).to(device, dtype) if has_xd else None
    w = rand(gen, n_out, n_in, std=n_in ** -0.5).to(device, dtype)
    bias = rand(gen, n_out).to(device, dtype) if has_bias else None
    a = rand(gen, r, n_in, std=n_in ** -0.5).to(device, dtype)
    b = rand(gen, n_out, r, std=r ** -0.5).to(device, dtype)
    g = rand(gen, *lead, n_out).to(device, dtype)
    return x, xd, w, bias, a, b, g


def widen(x, xd, a, b, g, scale, dtype):
    """atol factor for y and each gradient (x, xd, w, bias, a, b), see the module
    docstring: m_xa for what xa feeds (y, grad B), m_gb for what scale * g B feeds (grad x,
    grad xd, grad A), times sqrt(rows) for the sums over the rows."""
    rows = g.numel() // g.shape[-1]
    m_xa = m_gb = 1.0
    if dtype != torch.float32:
        def rms(t):
            return float(t.pow(2).mean().sqrt())
        m_xa = max(1.0, rms(scale * ((x if xd is None else xd).float() @ a.float().t())))
        m_gb = max(1.0, rms(scale * (g.float() @ b.float())))
    s = math.sqrt(rows)
    return m_xa, (m_gb, m_gb, s, s, s * m_gb, s * m_xa)


def reference(x, xd, w, bias, a, b, g, scale):
    """y, xa and the gradients (x, xd, w, bias, a, b) of the composed formula in float32."""
    ts = [t.float().requires_grad_() if t is not None else None for t in (x, xd, w, bias, a, b)]
    fx, fxd, fw, fbias, fa, fb = ts
    y = lora_linear_ref(fx, fw, fbias, fa, fb, scale, fxd)
    leaves = [t for t in ts if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, g.float()))
    xa = (fx if fxd is None else fxd).detach() @ fa.detach().t()
    return y.detach(), xa, [next(grads) if t is not None else None for t in ts]


@pytest.mark.parametrize("shape", LORA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("has_xd", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_lora_launchers_forward_backward(shape, dtype, has_xd, has_bias, device, close):
    x, xd, w, bias, a, b, g = make(shape, dtype, device, seed=sum(shape[0]) + shape[1], has_bias=has_bias,
                                   has_xd=has_xd)
    scale = 1.5
    y, xa = T.lora_fwd(x, xd, w, bias, a, b, scale)
    want_y, want_xa, want = reference(x, xd, w, bias, a, b, g, scale)
    wide_y, wide = widen(x, xd, a, b, g, scale, dtype)
    assert y.dtype == dtype and y.shape == want_y.shape and xa.shape == want_xa.shape
    close(y, want_y, dtype, scale=wide_y)
    close(xa, want_xa, dtype)
    needs = (True, has_xd, True, has_bias, True, True)
    got = T.lora_bwd(g, x, xd, w, a, b, xa, scale, has_xd, *needs)
    for name, gv, wv, need, s in zip(("x", "xd", "w", "bias", "a", "b"), got, want, needs, wide):
        if not need:
            assert gv is None, name
            continue
        assert gv.dtype == dtype and gv.shape == wv.shape, name
        close(gv, wv, dtype, scale=s)


def test_lora_bwd_computes_only_what_is_needed(device, close):
    """W frozen and no xd: only grad x (with the low-rank term) and grads A, B come back;
    x is passed only because A needs it."""
    x, _, w, _, a, b, g = make(LORA_SHAPES[0], torch.float32, device, seed=7, has_bias=False)
    scale = 0.5
    _, xa = T.lora_fwd(x, None, w, None, a, b, scale)
    gx, gxd, gw, gbias, ga, gb = T.lora_bwd(g, x, None, w, a, b, xa, scale, False,
                                           True, False, False, False, True, True)
    assert gxd is None and gw is None and gbias is None
    _, _, want = reference(x, None, w, None, a, b, g, scale)
    close(gx, want[0], torch.float32)
    close(ga, want[4], torch.float32)
    close(gb, want[5], torch.float32)


@pytest.mark.skipif(not CUDA, reason="large shapes and bf16 need a CUDA GPU (slow or wrong in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("has_xd", [False, True])
def test_lora_large_on_gpu(dtype, has_xd, close):
    shape = ((4, 1000), 1024, 2048, 16)  # 4000 rows: not a multiple of any tile
    x, xd, w, bias, a, b, g = make(shape, dtype, "cuda", seed=11, has_xd=has_xd)
    scale = 2.0
    y, xa = T.lora_fwd(x, xd, w, bias, a, b, scale)
    want_y, want_xa, want = reference(x, xd, w, bias, a, b, g, scale)
    wide_y, wide = widen(x, xd, a, b, g, scale, dtype)
    close(y, want_y, dtype, scale=wide_y)
    close(xa, want_xa, dtype)
    needs = (True, has_xd, True, True, True, True)
    got = T.lora_bwd(g, x, xd, w, a, b, xa, scale, has_xd, *needs)
    for gv, wv, need, s in zip(got, want, needs, wide):
        if need:
            close(gv, wv, dtype, scale=s)
