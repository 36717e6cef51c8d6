"""The Triton cross-entropy row kernel (`ce_rows_`) against F.cross_entropy per row and
its gradient softmax - onehot, which the kernel writes over the logits in place."""

import os

import pytest
import torch
import torch.nn.functional as F

T = pytest.importorskip("effc.kernels.triton.cross_entropy")
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def make(n, V, dtype, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, V, generator=gen)).to(device, dtype)
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[: n // 3]] = -100  # a third of the rows ignored
    return logits, targets.to(device)


def reference(logits, targets):
    """(loss per row, d loss_row / d logits) in float32 from the same (rounded) logits."""
    x = logits.float().requires_grad_()
    loss = F.cross_entropy(x, targets, ignore_index=-100, reduction="none")
    (p,) = torch.autograd.grad(loss.sum(), x)  # softmax - onehot; zero rows where ignored
    return loss.detach(), p


@pytest.mark.parametrize("n", [1, 5, 13])
@pytest.mark.parametrize("V", [7, 100, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ce_rows_against_torch(n, V, dtype, device, close):
    logits, targets = make(n, V, dtype, device, seed=n * 1000 + V)
    want_loss, want_p = reference(logits, targets)
    for block in (None, 32):  # one block per row, and several (the online max/sum)
        x = logits.clone()
        loss = T.ce_rows_(x, targets, block=block)
        assert loss.dtype == torch.float32 and loss.shape == (n,) and x.dtype == dtype
        close(loss, want_loss, torch.float32)
        close(x, want_p, dtype)
        ignored = targets == -100
        assert not loss[ignored].any() and not x[ignored].any()


def test_ce_rows_max_in_a_later_block(device, close):
    """The row's max sits in the last, partial block: the running sum is rescaled."""
    logits, targets = make(4, 70, torch.float32, device, seed=1)
    logits[:, 66] += 40.0
    targets[:] = torch.tensor([66, 3, -100, 69])
    want_loss, want_p = reference(logits, targets)
    x = logits.clone()
    loss = T.ce_rows_(x, targets, block=16)
    close(loss, want_loss, torch.float32)
    close(x, want_p, torch.float32)


def test_supports(device):
    logits, targets = make(3, 9, torch.float32, device)
    assert T.supports(logits, targets)
    assert not T.supports(logits.double(), targets)
    assert not T.supports(logits.t(), targets)  # not contiguous
    assert not T.supports(logits, targets.int())
    assert not T.supports(logits, targets[:2])
    assert not T.supports(logits[:, :0].contiguous(), targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunk_loop_with_the_triton_rows(dtype, device, close):
    """The op's CUDA path (linear_cross_entropy_torch with ce_rows_ for the softmax) on
    `device`: loss and both gradients against the float32 reference on the same inputs."""
    from effc.kernels.linear_ce import linear_cross_entropy_ref, linear_cross_entropy_torch

    gen = torch.Generator().manual_seed(4)
    h = torch.randn(2, 7, 12, generator=gen).to(device, dtype)
    w = (torch.randn(37, 12, generator=gen) / 4).to(device, dtype)
    targets = torch.randint(0, 37, (2, 7), generator=gen)
    targets[0, 2] = targets[1, 5] = -100
    targets = targets.to(device)
    loss, gh, gw = linear_cross_entropy_torch(h, w, targets, 4, True, True, T.ce_rows_)
    assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype and gh.shape == h.shape
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    want = linear_cross_entropy_ref(h32, w32, targets)
    want_gh, want_gw = torch.autograd.grad(want, (h32, w32))
    close(loss, want.detach(), dtype)
    close(gh, want_gh, dtype)
    close(gw, want_gw, dtype)


@pytest.mark.skipif(not CUDA, reason="large shapes and bf16 need a CUDA GPU (slow or wrong in the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ce_rows_large_on_gpu(dtype, close):
    logits, targets = make(1024, 50_257, dtype, "cuda", seed=2)  # V not a multiple of MAX_BLOCK
    want_loss, want_p = reference(logits, targets)
    x = logits.clone()
    loss = T.ce_rows_(x, targets)
    close(loss, want_loss, torch.float32, scale=10)  # lse over 50k columns, fp32 in both
    close(x, want_p, dtype)


@pytest.mark.skipif(not CUDA, reason="the op's CUDA kernel needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_cross_entropy_op_on_gpu(dtype):
    """The op's CUDA kernel (torch matmuls + ce_rows_) against the reference in float32."""
    from effc.kernels.linear_ce import linear_cross_entropy, linear_cross_entropy_ref

    gen = torch.Generator().manual_seed(3)
    h = torch.randn(4, 509, 256, generator=gen).to("cuda", dtype).requires_grad_()
    w = (torch.randn(32_000, 256, generator=gen) / 16).to("cuda", dtype).requires_grad_()
    targets = torch.randint(0, 32_000, (4, 509), generator=gen)
    targets[:, :7] = -100
    targets = targets.cuda()
    loss = linear_cross_entropy(h, w, targets, chunk=300)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want = linear_cross_entropy_ref(h32, w32, targets)
    want_gh, want_gw = torch.autograd.grad(want, (h32, w32))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(loss, want, rtol=tol, atol=tol)
    torch.testing.assert_close(gh.float(), want_gh, rtol=tol, atol=tol)
    torch.testing.assert_close(gw.float(), want_gw, rtol=tol, atol=tol)
