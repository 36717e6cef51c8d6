"""RMSNorm's Triton launchers against the torch formula, forward and backward."""

import os

import pytest
import torch

from effc.kernels.rmsnorm import rms_norm_ref

T = pytest.importorskip("effc.kernels.triton.rmsnorm")
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

SHAPES = [(3, 5, 7), (1, 1, 33), (17, 96)]


def reference(x, w, g, eps):
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    y = rms_norm_ref(x, w, eps)
    gx, gw = torch.autograd.grad(y, (x, w), g.float())
    return y, gx, gw


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rmsnorm_forward_backward(shape, dtype, device, close):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen)).to(device, dtype)
    g = torch.randn(shape, generator=gen).to(device, dtype)
    eps = 1e-5
    y, rstd = T.rms_norm_fwd(x, w, eps)
    want_y, want_gx, want_gw = reference(x, w, g, eps)
    close(y, want_y, dtype)
    assert rstd.dtype == torch.float32 and rstd.shape == shape[:-1]
    close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + eps), torch.float32)
    gx, gw = T.rms_norm_bwd(g, x, w, rstd)
    assert gx.dtype == dtype and gw.dtype == dtype
    close(gx, want_gx, dtype)
    rows = x.numel() // shape[-1]
    close(gw, want_gw, dtype, scale=rows)  # a sum over every row


@pytest.mark.skipif(not CUDA, reason="large shapes and bf16 need a CUDA GPU (slow or wrong in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_large_rows_on_gpu(dtype, close):
    x = torch.randn(8192, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    g = torch.randn_like(x)
    y, rstd = T.rms_norm_fwd(x, w, 1e-6)
    want_y, want_gx, want_gw = reference(x, w, g, 1e-6)
    close(y, want_y, dtype)
    gx, gw = T.rms_norm_bwd(g, x, w, rstd)
    close(gx, want_gx, dtype)
    close(gw, want_gw, dtype, scale=8192)
