"""LoRA linear: the op `effc::lora_linear` (and its backward op) against the composed
reference `lora_linear_ref` and an einsum formula written here, outputs AND every gradient
(x, xd, W, bias, A, B), over small odd 3-D shapes; float64 with gradcheck, float32 within
TOL; torch.library.opcheck on both ops; what backward keeps (pins the module docstring).
"""

import pytest
import torch
from torch.autograd import gradcheck

from effc.kernels.lora import lora_linear, lora_linear_ref

pytestmark = pytest.mark.usefixtures("one_thread")

# dtype -> (rtol, atol) for the op against a reference evaluated in the same dtype.
# float32: sums of <= 40 products in another order (addmm's, with the scale as alpha),
# of terms up to ~100 here (standard normal weights): a few eps * 100 ~ 1e-5 near zeros.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
}
DTYPES = list(TOL)

# (lead dims, in, out, r)
SHAPES = [((3, 5), 7, 9, 2), ((1, 4), 6, 5, 1), ((2, 3), 11, 13, 3)]
SCALE = 1.75
NAMES = ("x", "xd", "w", "bias", "a", "b")


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def randn(*shape, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def make(shape, dtype=torch.float64, seed=0, has_xd=False, has_bias=True, w_grad=True, x_grad=True):
    """(x, xd, w, bias, a, b): xd, bias None unless asked; B nonzero (not LoRA's zero init)
    so that every gradient is exercised."""
    lead, n_in, n_out, r = shape
    x = randn(*lead, n_in, dtype=dtype, seed=seed, grad=x_grad)
    xd = randn(*lead, n_in, dtype=dtype, seed=seed + 1) if has_xd else None
    w = randn(n_out, n_in, dtype=dtype, seed=seed + 2, grad=w_grad)
    bias = randn(n_out, dtype=dtype, seed=seed + 3) if has_bias else None
    a = randn(r, n_in, dtype=dtype, seed=seed + 4)
    b = randn(n_out, r, dtype=dtype, seed=seed + 5)
    return x, xd, w, bias, a, b


def formula(x, xd, w, bias, a, b, scale):
    """y_o = sum_i x_i W_oi + bias_o + scale * sum_k B_ok sum_i xd_i A_ki (Hu et al. 2021)."""
    xin = x if xd is None else xd
    y = torch.einsum("...i,oi->...o", x, w) + scale * torch.einsum("...k,ok->...o", torch.einsum("...i,ki->...k", xin, a), b)
    return y if bias is None else y + bias


def op(x, xd, w, bias, a, b, scale):
    return lora_linear(x, w, bias, a, b, scale, xd)


def ref(x, xd, w, bias, a, b, scale):
    return lora_linear_ref(x, w, bias, a, b, scale, xd)


def grads(fn, inputs, scale=SCALE, seed=99):
    """Output and the gradient of <fn(*inputs), g> for each input (None where the input is
    None or needs no gradient), for a fixed random upstream g."""
    out = fn(*inputs, scale)
    g = randn(*out.shape, dtype=out.dtype, seed=seed, grad=False)
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, leaves, g))
    return out, [next(got) if t is not None and t.requires_grad else None for t in inputs]


def check_against(fn_want, inputs, dtype):
    out, got = grads(op, inputs)
    want_out, want = grads(fn_want, inputs)
    close(out, want_out, dtype)
    for name, gv, wv in zip(NAMES, got, want):
        assert (gv is None) == (wv is None), name
        if gv is not None:
            assert gv.dtype == wv.dtype and gv.shape == wv.shape, name
            close(gv, wv, dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_xd", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
def test_lora_linear_matches_reference_outputs_and_grads(shape, dtype, has_xd, has_bias):
    inputs = make(shape, dtype, seed=sum(shape[0]) + shape[1], has_xd=has_xd, has_bias=has_bias)
    check_against(ref, inputs, dtype)
    check_against(formula, inputs, dtype)


@pytest.mark.parametrize("has_xd", [False, True])
def test_lora_linear_gradcheck(has_xd):
    x, xd, w, bias, a, b = make(((2, 3), 4, 5, 2), seed=30, has_xd=has_xd)
    inputs = tuple(t for t in (x, xd, w, bias, a, b) if t is not None)

    def fn(*ts):
        if has_xd:
            return lora_linear(ts[0], ts[2], ts[3], ts[4], ts[5], 0.6, ts[1])
        return lora_linear(ts[0], ts[1], ts[2], ts[3], ts[4], 0.6)

    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("has_xd", [False, True])
def test_frozen_base_weight_gets_no_gradient(has_xd):
    """LoRA training: W (and its bias) frozen; x, xd, A, B still get the right gradients."""
    x, xd, w, bias, a, b = make(SHAPES[0], seed=40, has_xd=has_xd, w_grad=False)
    bias.requires_grad_(False)
    check_against(ref, (x, xd, w, bias, a, b), torch.float64)
    y = lora_linear(x, w, bias, a, b, SCALE, xd)
    y.backward(torch.ones_like(y))
    assert w.grad is None and bias.grad is None
    assert a.grad is not None and b.grad is not None and x.grad is not None


def test_adapter_only_gradients():
    """Nothing upstream needs a gradient (first layer, frozen W): only A and B get one."""
    x, xd, w, bias, a, b = make(SHAPES[2], seed=50, has_xd=True, w_grad=False, x_grad=False)
    xd.requires_grad_(False)
    bias.requires_grad_(False)
    check_against(ref, (x, xd, w, bias, a, b), torch.float64)


# ---------------------------------------------------------------- opcheck


@pytest.mark.parametrize("has_xd", [False, True])
@pytest.mark.parametrize("has_bias", [False, True])
@pytest.mark.parametrize("w_grad", [False, True])
def test_lora_linear_opcheck(has_xd, has_bias, w_grad):
    x, xd, w, bias, a, b = make(SHAPES[0], dtype=torch.float32, seed=60, has_xd=has_xd, has_bias=has_bias,
                                w_grad=w_grad)
    torch.library.opcheck(torch.ops.effc.lora_linear.default, (x, xd, w, bias, a, b, SCALE))


# (has_xd, need_x, need_xd, need_w, need_bias, need_a, need_b)
BACKWARD_FLAGS = [
    (False, True, False, True, True, True, True),
    (True, True, True, True, True, True, True),
    (False, True, False, False, False, True, True),
    (True, False, False, False, False, True, True),
    (True, True, False, False, True, False, True),
]


@pytest.mark.parametrize("flags", BACKWARD_FLAGS)
def test_lora_linear_backward_opcheck(flags):
    has_xd, need_w, need_a, need_b = flags[0], flags[3], flags[5], flags[6]
    lead, _, n_out, r = SHAPES[0]
    x, xd, w, _, a, b = (t.detach() if t is not None else None
                         for t in make(SHAPES[0], dtype=torch.float32, seed=70, has_xd=True))
    g = randn(*lead, n_out, dtype=torch.float32, seed=71, grad=False)
    xa = randn(*lead, r, dtype=torch.float32, seed=72, grad=False)
    args = (g, x if need_w or (need_a and not has_xd) else None, xd if has_xd and need_a else None, w, a, b,
            xa if need_b else None, SCALE, *flags)
    torch.library.opcheck(torch.ops.effc.lora_linear_backward.default, args)
    out = torch.ops.effc.lora_linear_backward(*args)
    for name, t, need in zip(NAMES, out, flags[1:]):
        assert (t is None) != need, name


# ---------------------------------------------------------------- saved for backward


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


@pytest.mark.parametrize("has_xd,w_grad,expected", [
    (False, False, ("x",)),  # A reads x; W frozen
    (True, False, ("xd",)),  # A reads xd; x is not needed at all
    (True, True, ("x", "xd")),  # grad W needs x, grad A needs xd
    (False, True, ("x",)),  # one x serves both
])
def test_saves_inputs_and_xa_only(has_xd, w_grad, expected):
    """Docstring: backward keeps x or xd (as needed) and xa = xd A^T (..., r), plus the
    parameters, which are held anyway; never y, never a copy of an input."""
    x, xd, w, bias, a, b = make(SHAPES[0], dtype=torch.float32, seed=80, has_xd=has_xd, w_grad=w_grad)
    if has_xd:
        xd.requires_grad_(False)  # xd is dropout(x) in practice; its gradient is tested above
    (y, xa), saved = saved_by(lambda *t: torch.ops.effc.lora_linear(*t, SCALE), x, xd, w, bias, a, b)
    params = (w, a, b)
    assert not any(t.data_ptr() == y.data_ptr() for t in saved)
    activations = [t for t in saved if not any(same_tensor(t, p) for p in params)]
    by_name = {"x": x, "xd": xd}
    assert len(activations) == len(expected) + 1
    for name, t in zip(expected, activations):
        assert same_tensor(t, by_name[name]), name
    assert same_tensor(activations[-1], xa)
    assert xa.shape == (*SHAPES[0][0], SHAPES[0][3]) and not xa.requires_grad
    close(xa, (x if xd is None else xd).detach() @ a.detach().T, torch.float32)
    assert len(saved) - len(activations) <= len(params)


def test_public_wrapper_saves_no_output():
    """Through `lora_linear` (W frozen, no xd): exactly x and one (..., r) tensor besides
    the parameters; nothing of the output's (..., out) size."""
    x, _, w, bias, a, b = make(SHAPES[2], dtype=torch.float32, seed=90, w_grad=False)
    y, saved = saved_by(lambda *t: lora_linear(*t, SCALE), x, w, bias, a, b)
    activations = [t for t in saved if not any(same_tensor(t, p) for p in (w, a, b))]
    assert len(activations) == 2
    assert same_tensor(activations[0], x)
    assert activations[1].shape == (*SHAPES[2][0], SHAPES[2][3])
    assert not any(t.shape[-1] == y.shape[-1] and t.dim() == y.dim() for t in activations)
