"""SwiGLU's Triton launchers against the torch formula, forward and backward."""

import os

import pytest
import torch

from effc.kernels.swiglu import swiglu_ref

T = pytest.importorskip("effc.kernels.triton.swiglu")
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

SHAPES = [(3, 5, 7), (1, 1, 33), (17, 96), (1030,)]  # the last spans two blocks, the second partial


def reference(gate, up, g):
    gate, up = gate.float().requires_grad_(), up.float().requires_grad_()
    y = swiglu_ref(gate, up)
    g_gate, g_up = torch.autograd.grad(y, (gate, up), g.float())
    return y, g_gate, g_up


def inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(shape, generator=gen)).to(device, dtype)  # both tails of the sigmoid
    up = torch.randn(shape, generator=gen).to(device, dtype)
    g = torch.randn(shape, generator=gen).to(device, dtype)
    return gate, up, g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_forward_backward(shape, dtype, device, close):
    gate, up, g = inputs(shape, dtype, device)
    want_y, want_gg, want_gu = reference(gate, up, g)
    y = T.swiglu_fwd(gate, up)
    assert y.dtype == dtype and y.shape == shape
    close(y, want_y, dtype)
    g_gate, g_up = T.swiglu_bwd(g, gate, up)
    assert g_gate.dtype == dtype and g_up.dtype == dtype
    assert g_gate.shape == shape and g_up.shape == shape
    close(g_gate, want_gg, dtype)
    close(g_up, want_gu, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_non_contiguous_inputs(dtype, device, close):
    gate, up, g = inputs((6, 9), dtype, device, seed=1)
    gate, up, g = gate.t(), up.t(), g.t()  # (9, 6), transposed views
    want_y, want_gg, want_gu = reference(gate, up, g)
    close(T.swiglu_fwd(gate, up), want_y, dtype)
    g_gate, g_up = T.swiglu_bwd(g, gate, up)
    close(g_gate, want_gg, dtype)
    close(g_up, want_gu, dtype)


def test_swiglu_supports():
    a = torch.zeros(3, 4)
    assert T.supports(a, a) and T.supports(a.half(), a.half()) and T.supports(a.bfloat16(), a.bfloat16())
    assert not T.supports(a.double(), a.double())
    assert not T.supports(a, a.half())
    assert not T.supports(a, torch.zeros(4, 3))
    assert not T.supports(torch.zeros(0, 4), torch.zeros(0, 4))


@pytest.mark.skipif(not CUDA, reason="large shapes and bf16 need a CUDA GPU (slow or wrong in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_large_on_gpu(dtype, close):
    gate, up, g = inputs((4096, 11008), dtype, "cuda", seed=2)
    want_y, want_gg, want_gu = reference(gate, up, g)
    close(T.swiglu_fwd(gate, up), want_y, dtype)
    g_gate, g_up = T.swiglu_bwd(g, gate, up)
    close(g_gate, want_gg, dtype)
    close(g_up, want_gu, dtype)
