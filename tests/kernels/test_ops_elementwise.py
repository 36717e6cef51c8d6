"""The custom ops `effc::swiglu`, `effc::swiglu_backward` and `effc::rotary`: torch.library's
opcheck (schema, fake kernel, autograd registration, AOT dispatch), and outputs and
gradients against the references `swiglu_ref` / `rotary_ref` in float64 and float32.
Their CPU kernels run here; the Triton (CUDA) kernels are checked in tests/triton.
"""

import pytest
import torch
from torch.autograd import gradcheck

from effc.kernels.rotary import at_positions, rotary, rotary_ref, rotary_tables
from effc.kernels.swiglu import swiglu, swiglu_ref

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)}
DTYPES = list(TOL)


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def randn(*shape, dtype=torch.float64, seed=0, grad=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_(grad)


def out_and_grads(fn, inputs, g):
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return (out, *torch.autograd.grad(out, leaves, g))


# ---------------------------------------------------------------- SwiGLU

SWIGLU_SHAPES = [(3, 5, 7), (1, 1, 33), (4, 6)]


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_opcheck(shape, dtype):
    for grad in (True, False):
        gate = randn(*shape, dtype=dtype, seed=1, grad=grad, scale=3.0)
        up = randn(*shape, dtype=dtype, seed=2, grad=grad)
        torch.library.opcheck(torch.ops.effc.swiglu.default, (gate, up))


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_backward_opcheck(shape, dtype):
    g, gate, up = (randn(*shape, dtype=dtype, seed=s) for s in (3, 4, 5))
    torch.library.opcheck(torch.ops.effc.swiglu_backward.default, (g, gate, up))


def test_swiglu_opcheck_non_contiguous():
    gate, up = randn(6, 5, seed=6, grad=True).t(), randn(6, 5, seed=7, grad=True).t()
    torch.library.opcheck(torch.ops.effc.swiglu.default, (gate, up))


@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_op_matches_reference(shape, dtype):
    gate = randn(*shape, dtype=dtype, seed=8, grad=True, scale=3.0)
    up = randn(*shape, dtype=dtype, seed=9, grad=True)
    g = randn(*shape, dtype=dtype, seed=10)
    got = out_and_grads(swiglu, (gate, up), g)
    want = out_and_grads(swiglu_ref, (gate, up), g)
    assert got[0].dtype == dtype and len(got) == 3
    for a, b in zip(got, want):
        close(a, b, dtype)
    # the backward op on its own gives the same gradients
    g_gate, g_up = torch.ops.effc.swiglu_backward(g, gate.detach(), up.detach())
    close(g_gate, want[1], dtype)
    close(g_up, want[2], dtype)


def test_swiglu_op_gradcheck():
    gate, up = randn(3, 5, seed=11, grad=True, scale=2.0), randn(3, 5, seed=12, grad=True)
    assert gradcheck(swiglu, (gate, up))


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
def test_swiglu_grad_of_one_input(needs):
    gate = randn(4, 6, seed=13, grad=needs[0])
    up = randn(4, 6, seed=14, grad=needs[1])
    g = randn(4, 6, seed=15)
    _, got = out_and_grads(swiglu, (gate, up), g)
    _, want = out_and_grads(swiglu_ref, (gate, up), g)
    close(got, want, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swiglu_half_dtypes_compute_in_float32(dtype):
    """Half inputs: the output is in their dtype, the float32 result rounded once."""
    gate = randn(5, 7, dtype=torch.float32, seed=16, scale=3.0).to(dtype)
    up = randn(5, 7, dtype=torch.float32, seed=17).to(dtype)
    g = randn(5, 7, dtype=torch.float32, seed=18).to(dtype)
    y = swiglu(gate, up)
    assert y.dtype == dtype
    torch.testing.assert_close(y, swiglu_ref(gate.float(), up.float()).to(dtype), rtol=0, atol=0)
    g_gate, g_up = torch.ops.effc.swiglu_backward(g, gate, up)
    a, b = gate.float().requires_grad_(), up.float().requires_grad_()
    want_gate, want_up = torch.autograd.grad(swiglu_ref(a, b), (a, b), g.float())
    assert g_gate.dtype == dtype and g_up.dtype == dtype
    torch.testing.assert_close(g_gate, want_gate.to(dtype))  # torch's default tolerance for the dtype
    torch.testing.assert_close(g_up, want_up.to(dtype))


# ---------------------------------------------------------------- rotary

ROTARY_CASES = [(3, 5, 1, 14), (2, 3, 4, 6), (1, 1, 2, 2), (2, 7, 3, 10)]  # (B, T, heads, head_dim)


def tables(T, hd, dtype, layout, B, seed=0):
    """(cos, sin) in one of the layouts: "shared" (T, hd/2); "longer" (T + 3, hd/2), only
    the first T rows used; "positions" (B, T, hd/2), gathered at per-token positions."""
    rows = T + 3 if layout != "shared" else T
    cos, sin = rotary_tables(rows, hd, 100.0)
    if layout == "positions":
        pos = torch.randint(0, rows, (B, T), generator=torch.Generator().manual_seed(seed))
        cos, sin = at_positions(cos, pos), at_positions(sin, pos)
    return cos.to(dtype), sin.to(dtype)


LAYOUTS = ["shared", "longer", "positions"]


@pytest.mark.parametrize("B,T,H,hd", ROTARY_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_opcheck(B, T, H, hd, layout, dtype):
    cos, sin = tables(T, hd, dtype, layout, B, seed=20)
    for grad in (True, False):
        x = randn(B, T, H * hd, dtype=dtype, seed=21, grad=grad)
        torch.library.opcheck(torch.ops.effc.rotary.default, (x, cos, sin, H))


def test_rotary_opcheck_non_contiguous_x():
    B, T, H, hd = 2, 5, 2, 6
    wide = randn(B, T, 2 * H * hd, seed=22, grad=True)
    cos, sin = tables(T, hd, torch.float64, "longer", B)
    x = wide[..., H * hd:]  # the k half of a fused projection: a strided view
    assert not x.is_contiguous()
    torch.library.opcheck(torch.ops.effc.rotary.default, (x, cos, sin, H))
    g = randn(B, T, H * hd, seed=23)
    got = out_and_grads(lambda a: rotary(a[..., H * hd:], cos, sin, H), (wide,), g)
    want = out_and_grads(lambda a: rotary_ref(a[..., H * hd:].contiguous(), cos, sin, H), (wide,), g)
    for a, b in zip(got, want):
        close(a, b, torch.float64)


@pytest.mark.parametrize("B,T,H,hd", ROTARY_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_op_matches_reference(B, T, H, hd, layout, dtype):
    cos, sin = tables(T, hd, dtype, layout, B, seed=24)
    x = randn(B, T, H * hd, dtype=dtype, seed=25, grad=True)
    g = randn(B, T, H * hd, dtype=dtype, seed=26)
    got = out_and_grads(lambda a: rotary(a, cos, sin, H), (x,), g)
    want = out_and_grads(lambda a: rotary_ref(a, cos, sin, H), (x,), g)
    assert got[0].dtype == dtype and got[0].shape == x.shape
    for a, b in zip(got, want):
        close(a, b, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotary_op_gradcheck(layout):
    cos, sin = tables(4, 6, torch.float64, layout, 2, seed=27)
    assert gradcheck(lambda a: rotary(a, cos, sin, 2), (randn(2, 4, 12, seed=28, grad=True),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rotary_half_x_float32_tables(dtype):
    """Half x with the usual float32 tables: y is in x's dtype, the float32 rotation rounded once."""
    B, T, H, hd = 2, 5, 2, 6
    cos, sin = tables(T, hd, torch.float32, "longer", B)
    x = randn(B, T, H * hd, dtype=torch.float32, seed=29).to(dtype)
    y = rotary(x, cos, sin, H)
    assert y.dtype == dtype
    torch.testing.assert_close(y, rotary_ref(x.float(), cos, sin, H).to(dtype), rtol=0, atol=0)
