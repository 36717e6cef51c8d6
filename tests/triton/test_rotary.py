"""Rotary's Triton launcher against the torch rotation, both table layouts; the backward
is the same launcher with -sin, checked against autograd through the reference."""

import os

import pytest
import torch

from effc.kernels.rotary import at_positions, rotary_ref, rotary_tables

T = pytest.importorskip("effc.kernels.triton.rotary")
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

CASES = [(3, 5, 1, 14), (1, 1, 1, 2), (2, 3, 4, 6), (2, 7, 3, 10)]  # (B, T, heads, head_dim)


def reference(x, cos, sin, heads, g):
    x = x.float().requires_grad_()
    y = rotary_ref(x, cos.float(), sin.float(), heads)
    (gx,) = torch.autograd.grad(y, (x,), g.float())
    return y, gx


def inputs(B, T_, H, hd, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T_, H * hd, generator=gen).to(device, dtype)
    g = torch.randn(B, T_, H * hd, generator=gen).to(device, dtype)
    return x, g


def check(x, cos, sin, H, g, dtype, close):
    want_y, want_gx = reference(x, cos, sin, H, g)
    y = T.rotary_fwd(x, cos, sin, H)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    close(y, want_y, dtype)
    gx = T.rotary_fwd(g, cos, -sin, H)  # the transpose of the rotation
    close(gx, want_gx, dtype)


@pytest.mark.parametrize("B,T_,H,hd", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_shared_tables(B, T_, H, hd, dtype, device, close):
    x, g = inputs(B, T_, H, hd, dtype, device)
    cos, sin = (t.to(device) for t in rotary_tables(T_ + 3, hd, 100.0))  # longer than T: first T rows
    check(x, cos, sin, H, g, dtype, close)


@pytest.mark.parametrize("B,T_,H,hd", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_per_position_tables(B, T_, H, hd, dtype, device, close):
    """Packed sequences: positions restart within each row; tables gathered to (B, T, hd/2)."""
    x, g = inputs(B, T_, H, hd, dtype, device, seed=1)
    cos, sin = rotary_tables(T_ + 2, hd, 100.0)
    gen = torch.Generator().manual_seed(2)
    positions = torch.randint(0, T_ + 2, (B, T_), generator=gen)
    cos_BTH, sin_BTH = at_positions(cos, positions).to(device), at_positions(sin, positions).to(device)
    assert cos_BTH.shape == (B, T_, hd // 2)
    check(x, cos_BTH, sin_BTH, H, g, dtype, close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_batch_one_tables_broadcast_and_strided_x(dtype, device, close):
    B, T_, H, hd = 3, 5, 2, 6
    x, g = inputs(B, T_, H, hd, dtype, device, seed=3)
    cos, sin = rotary_tables(T_, hd, 10000.0)
    cos1, sin1 = cos[None].to(device), sin[None].to(device)  # (1, T, hd/2): broadcast over batch
    check(x, cos1, sin1, H, g, dtype, close)
    # x a non-contiguous view: the q part of a fused (B, T, 2D) projection
    wide = torch.randn(B, T_, 2 * H * hd, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    check(wide[..., : H * hd], cos.to(device), sin.to(device), H, g, dtype, close)


def test_rotary_half_precision_tables(device, close):
    """float16 tables with float32 x: the tables are read in their own dtype."""
    B, T_, H, hd = 2, 4, 2, 8
    x, g = inputs(B, T_, H, hd, torch.float32, device, seed=5)
    cos, sin = (t.half().to(device) for t in rotary_tables(T_, hd, 10000.0))
    check(x, cos, sin, H, g, torch.float32, close)


def test_rotary_supports():
    x = torch.zeros(2, 5, 8)
    cos = torch.zeros(7, 2)
    assert T.supports(x, cos, cos) and T.supports(x.half(), cos, cos) and T.supports(x.bfloat16(), cos, cos)
    assert T.supports(x, torch.zeros(2, 5, 2), torch.zeros(2, 5, 2))
    assert not T.supports(x.double(), cos, cos)
    assert not T.supports(x, cos.double(), cos.double())
    assert not T.supports(x, torch.zeros(4, 2), torch.zeros(4, 2))  # shorter than T
    assert not T.supports(x, torch.zeros(3, 5, 2), torch.zeros(3, 5, 2))  # batch neither 1 nor B
    assert not T.supports(torch.zeros(0, 5, 8), cos, cos)


@pytest.mark.skipif(not CUDA, reason="large shapes and bf16 need a CUDA GPU (slow or wrong in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_large_on_gpu(dtype, close):
    B, T_, H, hd = 4, 2048, 32, 128
    x, g = inputs(B, T_, H, hd, dtype, "cuda", seed=6)
    cos, sin = (t.cuda() for t in rotary_tables(T_, hd, 500000.0))
    check(x, cos, sin, H, g, dtype, close)
    positions = torch.randint(0, T_, (B, T_), device="cuda")
    check(x, at_positions(cos, positions), at_positions(sin, positions), H, g, dtype, close)
