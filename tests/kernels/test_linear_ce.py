"""Fused linear + cross-entropy (`effc::linear_cross_entropy`) against F.linear +
F.cross_entropy: loss and gradients of h and w over small odd shapes, chunk sizes that do
and do not divide the rows, frozen inputs, no_grad; opcheck; and what the op keeps and
allocates (nothing with N x V elements when chunk < N)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from effc.kernels.linear_ce import (ce_rows_torch_, default_chunk, linear_cross_entropy,
                                    linear_cross_entropy_ref, linear_cross_entropy_torch)

pytestmark = pytest.mark.usefixtures("one_thread")

# dtype -> (rtol, atol) of the op against the reference in the same dtype: sums over V
# and over the rows of a chunk in a different order (the loss sums up to N rows).
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
}
DTYPES = list(TOL)

# (B, T, D, V): odd sizes, V larger and smaller than D
SHAPES = [(2, 5, 7, 11), (3, 3, 6, 5), (1, 7, 4, 13)]


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def inputs(B, T, D, V, dtype, seed=0, ignore=2, grad_h=True, grad_w=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=dtype).requires_grad_(grad_h)
    w = (torch.randn(V, D, generator=g, dtype=dtype) / D ** 0.5).requires_grad_(grad_w)
    targets = torch.randint(0, V, (B, T), generator=g)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:ignore]] = -100
    return h, w, targets


def loss_and_grads(fn, h, w, targets):
    loss = fn(h, w, targets)
    leaves = [t for t in (h, w) if t.requires_grad]
    return (loss, *torch.autograd.grad(loss * 1.7, leaves))  # an upstream gradient != 1


def chunks(N):
    """A chunk that does not divide N, one row, exactly N, more than N, and the default."""
    return [1, 2, 3, N, N + 5, None]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_grads_match_reference(shape, dtype):
    B, T, D, V = shape
    h, w, targets = inputs(B, T, D, V, dtype)
    want = loss_and_grads(linear_cross_entropy_ref, h, w, targets)
    N = B * T
    assert N % 2 or N % 3  # some chunk below does not divide N
    for chunk in chunks(N):
        got = loss_and_grads(lambda a, b, t, c=chunk: linear_cross_entropy(a, b, t, c), h, w, targets)
        assert got[0].dtype == dtype and got[0].dim() == 0
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            close(a, b, dtype)


def test_gradcheck_float64():
    h, w, targets = inputs(2, 3, 4, 5, torch.float64, seed=13)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, targets, 4), (h, w))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_target_ignored_and_no_target_ignored(dtype):
    for ignore in (0, 6):
        h, w, targets = inputs(2, 3, 5, 9, dtype, seed=3, ignore=ignore)
        got = loss_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, 4), h, w, targets)
        want = loss_and_grads(linear_cross_entropy_ref, h, w, targets)
        for a, b in zip(got, want, strict=True):
            close(a, b, dtype)
    assert got[0].item() == 0 and not got[1].any() and not got[2].any()


def test_large_logits_are_stable():
    """Logits in the thousands: the max is subtracted before exp (float32)."""
    h, w, targets = inputs(2, 3, 5, 9, torch.float32, seed=4)
    h = (h.detach() * 300).requires_grad_()
    got = loss_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, 4), h, w, targets)
    want = loss_and_grads(linear_cross_entropy_ref, h, w, targets)
    assert all(torch.isfinite(t).all() for t in got)
    for a, b in zip(got, want, strict=True):
        close(a, b, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_w_and_frozen_h(dtype):
    B, T, D, V = SHAPES[0]
    for grad_h, grad_w in ((True, False), (False, True)):
        h, w, targets = inputs(B, T, D, V, dtype, seed=5, grad_h=grad_h, grad_w=grad_w)
        got = loss_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, 3), h, w, targets)
        want = loss_and_grads(linear_cross_entropy_ref, h, w, targets)
        assert len(got) == len(want) == 2
        for a, b in zip(got, want, strict=True):
            close(a, b, dtype)
        _, gh, gw = torch.ops.effc.linear_cross_entropy(h, w, targets, 3, grad_h, grad_w)
        assert (gh.numel() > 0) == grad_h and (gw.numel() > 0) == grad_w


def test_bfloat16_and_float16_match_reference_in_float32():
    """16-bit inputs: logits in the input dtype, softmax and loss in float32, gw summed in
    float32; against the float32 reference on the same (rounded) inputs."""
    for dtype in (torch.bfloat16, torch.float16):
        h, w, targets = inputs(3, 5, 8, 17, torch.float32, seed=6)
        h, w = h.detach().to(dtype).requires_grad_(), w.detach().to(dtype).requires_grad_()
        loss, gh, gw = loss_and_grads(lambda a, b, t: linear_cross_entropy(a, b, t, 4), h, w, targets)
        assert loss.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype
        h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        want = loss_and_grads(linear_cross_entropy_ref, h32, w32, targets)
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3  # logits and p rounded to 16 bits
        for a, b in zip((loss, gh, gw), want, strict=True):
            torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)


def test_no_grad_computes_no_gradients():
    h, w, targets = inputs(2, 5, 7, 11, torch.float32, seed=7)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, targets, 3)
    assert not loss.requires_grad
    close(loss, linear_cross_entropy_ref(h, w, targets).detach(), torch.float32)

    seen = []

    class Flags(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.effc.linear_cross_entropy.default:
                seen.append((args[4], args[5], out))
            return out

    with Flags(), torch.no_grad():
        linear_cross_entropy(h, w, targets, 3)
    ((grad_h, grad_w, (_, gh, gw)),) = seen
    assert not grad_h and not grad_w and gh.numel() == 0 and gw.numel() == 0
    # and when asked directly, with the flags off, gh and gw come back empty
    _, gh, gw = torch.ops.effc.linear_cross_entropy(h.detach(), w.detach(), targets, 3, False, False)
    assert gh.numel() == 0 and gw.numel() == 0
    # both frozen, grad enabled: nothing to compute either
    loss = linear_cross_entropy(h.detach(), w.detach(), targets, 3)
    assert not loss.requires_grad


def test_a_gradient_not_computed_in_forward_is_an_error():
    h, w, targets = inputs(2, 3, 4, 5, torch.float64, seed=8)
    loss, _, _ = torch.ops.effc.linear_cross_entropy(h, w, targets, 2, True, False)
    with pytest.raises(RuntimeError, match="grad_h/grad_w"):
        torch.autograd.grad(loss, (h, w))


def test_chunk_must_be_positive():
    h, w, targets = inputs(2, 3, 4, 5, torch.float64, seed=8)
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, w, targets, 0)


def test_default_chunk_rule():
    # float32 logits of chunk rows about the size of h: N*D*4 / (V*4) rows
    assert default_chunk(2048, 512, 8192, 4) == 128
    assert default_chunk(2048, 512, 8192, 2) == 64
    assert default_chunk(10, 4, 1000, 4) == 1  # at least one row
    assert default_chunk(10, 100, 5, 8) == 10  # at most N


def test_ce_rows_torch_matches_cross_entropy():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64)
    targets = torch.tensor([3, -100, 0, 10, -100, 7])
    x = logits.clone().requires_grad_()
    want = torch.nn.functional.cross_entropy(x, targets, reduction="none")
    (want_p,) = torch.autograd.grad(want.sum(), x)  # softmax - onehot, zero rows when ignored
    got_p = logits.clone()
    got = ce_rows_torch_(got_p, targets)
    close(got, want.detach(), torch.float64)
    close(got_p, want_p, torch.float64)


@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True)])
def test_opcheck(flags):
    grad_h, grad_w = flags
    h, w, targets = inputs(2, 5, 7, 11, torch.float64, seed=10, grad_h=grad_h, grad_w=grad_w)
    torch.library.opcheck(torch.ops.effc.linear_cross_entropy.default, (h, w, targets, 3, grad_h, grad_w))
    h, w, targets = inputs(1, 3, 4, 6, torch.float32, seed=11, grad_h=grad_h, grad_w=grad_w)
    torch.library.opcheck(torch.ops.effc.linear_cross_entropy.default, (h, w, targets, 7, grad_h, grad_w))


# ---------------------------------------------------------------- memory


OP = torch.ops.effc.linear_cross_entropy.default


class _Largest(TorchDispatchMode):
    """The element count of the largest tensor any op returns (forward and backward).
    A mode sees a custom op as one call; for effc::linear_cross_entropy it runs the op's CPU
    kernel (linear_cross_entropy_torch) with the mode on, so the ops inside are seen too."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is OP:
            self.ops += 1
            with self:
                out = linear_cross_entropy_torch(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _saved_and_largest(fn, h, w, targets):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with _Largest() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(h, w, targets)
        loss.backward()
    assert mode.ops == (fn is not linear_cross_entropy_ref)
    return saved, mode.largest


def test_nothing_of_n_by_v_is_saved_or_allocated():
    # N = 24 rows, V = 37, D = 3, chunk 5: N*V = 888 > 5*V = 185 > V*D = 111 > N*D = 72
    B, T, D, V = 4, 6, 3, 37
    N = B * T
    for grad_w in (True, False):
        h, w, targets = inputs(B, T, D, V, torch.float32, seed=12, grad_w=grad_w)
        saved, largest = _saved_and_largest(lambda a, b, t: linear_cross_entropy(a, b, t, 5), h, w, targets)
        shapes = sorted(tuple(t.shape) for t in saved)
        assert shapes == sorted([(B, T, D)] + ([(V, D)] if grad_w else [])), shapes
        assert all(t.numel() < N * V for t in saved)
        assert 5 * V <= largest < N * V, largest  # one chunk's logits, never all of them
        # the reference does keep and make (N, V) tensors: the check can fail
        h.grad = w.grad = None
        saved, largest = _saved_and_largest(linear_cross_entropy_ref, h, w, targets)
        assert largest == N * V and any(t.numel() == N * V for t in saved)
