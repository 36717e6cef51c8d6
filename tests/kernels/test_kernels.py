"""Kernels: every op against a reference written here (a formula, or plain torch code),
outputs AND gradients, over small odd shapes; float64 with gradcheck, float32 within the
tolerances of TOL. The saved-for-backward checks pin what `compiler/cost.py` counts.
"""

import math

import pytest
import torch
from torch.autograd import gradcheck

from effc.kernels.attention import attention, attention_ref
from effc.kernels.dropout import Dropout
from effc.kernels.rmsnorm import rms_norm, rms_norm_ref
from effc.kernels.rotary import rotary, rotary_tables
from effc.kernels.swiglu import swiglu, swiglu_ref

# dtype -> (rtol, atol) for a kernel against a reference evaluated in the same dtype.
# float32: a few ulps of reductions over <= 16 elements (softmax, mean of squares).
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
}
DTYPES = list(TOL)

SHAPES = [(3, 7, 10), (1, 5, 6), (2, 1, 4), (4, 3, 2)]


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def randn(*shape, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def grads(fn, inputs, seed=99):
    """Output and the gradients of <fn(*inputs), g> for a fixed random upstream g."""
    out = fn(*inputs)
    g = randn(*out.shape, dtype=out.dtype, seed=seed, grad=False)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return (out, *torch.autograd.grad(out, leaves, g))


def saved_by(fn, *inputs):
    """The tensors autograd packs while `fn(*inputs)` runs (what backward will hold)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return out, saved


def same_tensor(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


# ---------------------------------------------------------------- RMSNorm


def rms_norm_formula(x, w, eps):
    """y_i = x_i / sqrt(mean_j x_j^2 + eps) * w_i (Zhang & Sennrich 2019)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_formula_outputs_and_grads(shape, dtype):
    x = randn(*shape, dtype=dtype, seed=1)
    w = (1 + 0.5 * randn(shape[-1], dtype=dtype, seed=2, grad=False)).requires_grad_()
    for eps in (1e-5, 0.3):  # a large eps so that its placement matters
        got = grads(lambda a, b: rms_norm(a, b, eps), (x, w))
        want = grads(lambda a, b: rms_norm_formula(a, b, eps), (x, w))
        for a, b in zip(got, want):
            close(a, b, dtype)
        close(rms_norm_ref(x, w, eps), want[0], dtype)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_rms_norm_gradcheck(shape):
    x, w = randn(*shape, seed=3), randn(shape[-1], seed=4)
    assert gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_rms_norm_grads_of_one_input(needs):
    """A frozen norm weight (LoRA) or a constant input: the other gradient is still right."""
    x = randn(3, 7, 10, seed=5, grad=needs[0])
    w = randn(10, seed=6, grad=needs[1])
    _, got = grads(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    _, want = grads(lambda a, b: rms_norm_formula(a, b, 1e-5), (x, w))
    close(got, want, torch.float64)


def test_rms_norm_saves_input_and_rstd_only():
    """Docstring: saves its input and the per-row reciprocal rms; the weight it also keeps
    is a parameter, held anyway, so it costs no activation memory."""
    x = randn(3, 7, 10, dtype=torch.float32, seed=7)
    w = randn(10, dtype=torch.float32, seed=8)
    _, saved = saved_by(lambda a, b: rms_norm(a, b, 1e-5), x, w)
    assert len(saved) == 3
    activations = [t for t in saved if not same_tensor(t, w)]
    assert len(activations) == 2
    full, per_row = sorted(activations, key=lambda t: -t.numel())
    assert same_tensor(full, x)  # the input itself, not a copy
    assert per_row.shape == (3, 7)
    expected = 1 / torch.sqrt(x.detach().pow(2).mean(-1) + 1e-5)
    close(per_row, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rms_norm_opcheck(dtype):
    """effc::rms_norm and its backward op: schema, fake kernel, autograd registration and
    AOT dispatch (torch.library.opcheck), on a 3-D and a non-contiguous input."""
    x = randn(3, 5, 7, dtype=torch.float32, seed=20, grad=False).to(dtype).requires_grad_()
    w = randn(7, dtype=torch.float32, seed=21, grad=False).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.effc.rms_norm.default, (x, w, 1e-5))
    xt = randn(7, 5, dtype=torch.float32, seed=22, grad=False).to(dtype).t()  # (5, 7), not contiguous
    torch.library.opcheck(torch.ops.effc.rms_norm.default, (xt, w.detach(), 1e-3))
    rstd = torch.ops.effc.rms_norm(x.detach(), w.detach(), 1e-5)[1]
    g = randn(3, 5, 7, dtype=torch.float32, seed=23, grad=False).to(dtype)
    torch.library.opcheck(torch.ops.effc.rms_norm_backward.default, (g, x.detach(), w.detach(), rstd))


# ---------------------------------------------------------------- SwiGLU


def swiglu_formula(gate, up):
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_formula_outputs_and_grads(shape, dtype):
    gate, up = randn(*shape, dtype=dtype, seed=10), randn(*shape, dtype=dtype, seed=11)
    got = grads(swiglu, (gate, up))
    want = grads(swiglu_formula, (gate, up))
    for a, b in zip(got, want):
        close(a, b, dtype)
    close(swiglu_ref(gate, up), want[0], dtype)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_swiglu_gradcheck(shape):
    assert gradcheck(swiglu, (randn(*shape, seed=12), randn(*shape, seed=13)))


def test_swiglu_saves_its_two_inputs_only():
    gate, up = randn(5, 9, dtype=torch.float32, seed=14), randn(5, 9, dtype=torch.float32, seed=15)
    _, saved = saved_by(swiglu, gate, up)
    assert len(saved) == 2
    assert same_tensor(saved[0], gate) and same_tensor(saved[1], up)


# ---------------------------------------------------------------- rotary


def rotary_complex(x_BTD, heads, theta, positions=None):
    """Independent formulation: within a head, channels (i, i + hd/2) are the real and
    imaginary parts of z_i, and position p multiplies z_i by exp(1j * p * theta^(-2i/hd))."""
    B, T, D = x_BTD.shape
    hd = D // heads
    x = x_BTD.detach().double().reshape(B, T, heads, hd)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:])  # (B, T, H, hd/2)
    pos = torch.arange(T, dtype=torch.float64) if positions is None else positions.double()
    freq = theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    angle = pos[:, None] * freq[None, :]  # (T, hd/2)
    z = z * torch.polar(torch.ones_like(angle), angle)[None, :, None, :]
    return torch.cat((z.real, z.imag), -1).reshape(B, T, D).to(x_BTD.dtype)


def tables64(seq, hd, theta):
    freq = theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * freq
    return angle.cos(), angle.sin()


ROTARY_CASES = [(3, 7, 2, 6), (2, 5, 3, 4), (1, 1, 1, 8), (2, 9, 1, 2)]  # (B, T, heads, head_dim)


@pytest.mark.parametrize("seq,hd,theta", [(7, 6, 10000.0), (13, 4, 500.0), (1, 2, 10.0)])
def test_rotary_tables_match_formula(seq, hd, theta):
    cos, sin = rotary_tables(seq, hd, theta)
    want_cos, want_sin = tables64(seq, hd, theta)
    assert cos.shape == sin.shape == (seq, hd // 2) and cos.dtype == torch.float32
    close(cos, want_cos.float(), torch.float32)
    close(sin, want_sin.float(), torch.float32)


@pytest.mark.parametrize("B,T,H,hd", ROTARY_CASES)
@pytest.mark.parametrize("theta", [10000.0, 7.0])
def test_rotary_matches_complex_formulation(B, T, H, hd, theta):
    # float64 with exact tables; float32 with the kernel's own (fp32) tables
    x64 = randn(B, T, H * hd, seed=20, grad=False)
    cos, sin = tables64(T + 2, hd, theta)  # longer tables than the sequence: sliced to T
    close(rotary(x64, cos, sin, H), rotary_complex(x64, H, theta), torch.float64)
    x32 = x64.float()
    cos32, sin32 = rotary_tables(T + 2, hd, theta)
    close(rotary(x32, cos32, sin32, H), rotary_complex(x32, H, theta), torch.float32)


@pytest.mark.parametrize("B,T,H,hd", ROTARY_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_grads_match_complex_formulation(B, T, H, hd, dtype):
    """Rotation is linear, so the gradient is the transpose: rotation by -angle."""
    x = randn(B, T, H * hd, dtype=dtype, seed=21)
    cos, sin = (t.to(dtype) for t in tables64(T, hd, 10000.0))
    out, gx = grads(lambda a: rotary(a, cos, sin, H), (x,), seed=22)
    g = randn(B, T, H * hd, dtype=dtype, seed=22, grad=False)
    # <R x, g> = <x, R^T g>: R^T g is g rotated by the negative angles
    want = rotary_complex(g, H, 10000.0, positions=-torch.arange(T, dtype=torch.float64))
    close(gx, want, dtype)


def test_rotary_gradcheck():
    cos, sin = tables64(7, 6, 10000.0)
    assert gradcheck(lambda a: rotary(a, cos, sin, 2), (randn(3, 7, 12, seed=23),))


def test_rotary_preserves_per_head_norms():
    x = randn(3, 7, 3 * 6, seed=24, grad=False)
    cos, sin = tables64(7, 6, 10000.0)
    y = rotary(x, cos, sin, 3)
    norms = lambda t: t.reshape(3, 7, 3, 6).norm(dim=-1)  # (B, T, H)
    close(norms(y), norms(x), torch.float64)


@pytest.mark.parametrize("theta", [10000.0, 3.0])
def test_rotary_dot_products_depend_only_on_relative_position(theta):
    """The same q and k vectors at every position: q_m . k_n depends on m - n only."""
    T, hd = 11, 8
    q = randn(1, 1, hd, seed=25, grad=False).expand(1, T, hd).contiguous()
    k = randn(1, 1, hd, seed=26, grad=False).expand(1, T, hd).contiguous()
    cos, sin = tables64(T, hd, theta)
    rq, rk = rotary(q, cos, sin, 1)[0], rotary(k, cos, sin, 1)[0]  # (T, hd)
    scores = rq @ rk.T  # (T, T)
    for shift in (1, 3):
        close(scores[shift:, shift:], scores[:-shift, :-shift], torch.float64)
    # and it does depend on the offset (not a trivially constant score)
    assert not torch.allclose(scores[5, 0], scores[5, 5])


def test_rotary_saves_no_activation():
    x = randn(2, 5, 8, dtype=torch.float32, seed=27)
    cos, sin = rotary_tables(5, 4, 10000.0)
    _, saved = saved_by(lambda a: rotary(a, cos, sin, 2), x)
    assert len(saved) == 2 and same_tensor(saved[0], cos) and same_tensor(saved[1], sin)


# ---------------------------------------------------------------- attention


def attention_loop(q, k, v, heads, kv_heads):
    """Head by head with an explicit -inf causal mask; query head h reads key/value head
    h // (heads / kv_heads) (consecutive query heads share one kv head, as in Llama)."""
    B, T, D = q.shape
    hd = D // heads
    outs = []
    for h in range(heads):
        j = h // (heads // kv_heads)
        qh = q[..., h * hd:(h + 1) * hd]
        kh, vh = k[..., j * hd:(j + 1) * hd], v[..., j * hd:(j + 1) * hd]
        s = qh @ kh.transpose(-1, -2) / math.sqrt(hd)  # (B, T, T)
        mask = torch.full((T, T), float("-inf"), dtype=q.dtype).triu(1)
        outs.append(torch.softmax(s + mask, dim=-1) @ vh)
    return torch.cat(outs, -1)


ATTN_CASES = [(2, 7, 4, 4, 3), (1, 5, 4, 2, 2), (3, 6, 4, 1, 3), (2, 1, 3, 3, 2), (1, 9, 2, 2, 5)]


@pytest.mark.parametrize("B,T,H,KV,hd", ATTN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_loop_over_heads(B, T, H, KV, hd, dtype):
    q = randn(B, T, H * hd, dtype=dtype, seed=30)
    k, v = randn(B, T, KV * hd, dtype=dtype, seed=31), randn(B, T, KV * hd, dtype=dtype, seed=32)
    got = grads(lambda a, b, c: attention(a, b, c, H, KV), (q, k, v))
    want = grads(lambda a, b, c: attention_loop(a, b, c, H, KV), (q, k, v))
    ref = grads(lambda a, b, c: attention_ref(a, b, c, H, KV), (q, k, v))
    for a, b, c in zip(got, want, ref):
        close(a, b, dtype)
        close(c, b, dtype)


@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (4, 1)])
def test_attention_gradcheck(H, KV):
    hd = 3
    q, k, v = randn(2, 5, H * hd, seed=33), randn(2, 5, KV * hd, seed=34), randn(2, 5, KV * hd, seed=35)
    assert gradcheck(lambda a, b, c: attention(a, b, c, H, KV), (q, k, v))


def test_attention_is_causal():
    """Changing the keys and values of later positions leaves earlier outputs unchanged."""
    q = randn(1, 6, 4 * 2, seed=36, grad=False)  # 4 heads of width 2
    k, v = randn(1, 6, 2 * 2, seed=37, grad=False), randn(1, 6, 2 * 2, seed=38, grad=False)
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:] += 5.0
    v2[:, 4:] -= 3.0
    a, b = attention(q, k, v, 4, 2), attention(q, k2, v2, 4, 2)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=0)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_attention_gqa_groups_consecutive_heads():
    """kv_heads=2 with 4 query heads: heads 0, 1 read kv head 0 and heads 2, 3 kv head 1.
    Equal queries in heads 0 and 1 give equal outputs; heads 1 and 2 differ."""
    hd = 3
    q = randn(1, 5, hd, seed=39, grad=False).repeat(1, 1, 4)  # all four heads alike
    k, v = randn(1, 5, 2 * hd, seed=40, grad=False), randn(1, 5, 2 * hd, seed=41, grad=False)
    o = attention(q, k, v, 4, 2).reshape(1, 5, 4, hd)
    torch.testing.assert_close(o[:, :, 0], o[:, :, 1])
    torch.testing.assert_close(o[:, :, 2], o[:, :, 3])
    assert not torch.allclose(o[:, :, 1], o[:, :, 2])


# ---------------------------------------------------------------- dropout


def test_dropout_eval_and_p0_are_identity():
    x = randn(4, 5, dtype=torch.float32, seed=50)
    d = Dropout(0.4).eval()
    assert torch.equal(d(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_train_zeros_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    n = 200_000
    x = (torch.rand(n) + 0.5).requires_grad_()  # no zeros of its own
    y = Dropout(p).train()(x)
    kept = y != 0
    # fraction dropped within 5 standard deviations of p
    assert abs((~kept).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    close(y[kept], x.detach()[kept] / (1 - p), torch.float32)
    g = torch.randn(n)
    y.backward(g)
    close(x.grad, g * kept / (1 - p), torch.float32)


def test_dropout_saves_a_bool_mask():
    x = randn(6, 7, dtype=torch.float32, seed=51)
    torch.manual_seed(1)
    y, saved = saved_by(Dropout(0.3).train(), x)
    assert len(saved) == 1
    (mask,) = saved
    assert mask.dtype == torch.bool and mask.element_size() == 1 and mask.shape == x.shape
    assert torch.equal(mask, y != 0)
