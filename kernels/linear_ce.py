"""Fused linear + cross-entropy over the vocabulary, in chunks of rows: the summed loss of
logits = h @ w^T against integer targets, without ever holding the (N, V) logits.

`linear_cross_entropy_ref` is the reference: F.linear then F.cross_entropy (sum over the
targets that are not -100), which materialises the (N, V) logits, and whose autograd
keeps the (N, V) log-softmax for backward and makes an (N, V) gradient of the logits.

`linear_cross_entropy` is the kernel: the custom op `effc::linear_cross_entropy` (fake
kernel, autograd, CPU kernel; the CUDA kernel uses torch matmuls and the Triton row
kernel `effc.kernels.triton.cross_entropy.ce_rows_` for the softmax). It walks the
flattened (N, D) h `chunk` rows at a time:

    logits_c = h_c @ w^T                   (chunk, V), in h's dtype
    lse      = logsumexp(logits_c)         float32 math (float64 for float64 inputs)
    loss    += sum(lse - logits_c[target]) over the rows whose target is not -100
    p        = softmax(logits_c) - onehot  in logits_c's buffer; zero rows for ignored targets
    gh_c     = p @ w                       when grad_h
    gw      += p^T @ h_c                   when grad_w

so the gradients are computed in the same pass as the loss ("gradient in forward"), and
backward only scales the saved gh and gw by the incoming gradient of the loss (a scalar):
no logits are recomputed. The op returns (loss, gh, gw): loss is 0-dim float32 (float64
for float64 inputs), gh has h's shape and dtype, gw w's; either is an empty tensor when
its flag is off. `linear_cross_entropy` sets grad_h = torch.is_grad_enabled() and
h.requires_grad (likewise grad_w), so frozen weights and no_grad evaluation pay nothing
for the gradients. Targets get no gradient.

Default chunk (`default_chunk`): the rows whose float32 logits take about as many bytes
as h itself, chunk = N*D*h.element_size() // (V*4), clamped to [1, N]: the transient
logits then cost no more than one more copy of h.

Memory, with N = B*T rows and bytes b of the dtype:
  saved for backward: gh (N*D*b) when grad_h, gw (V*D*b) when grad_w; nothing else, and
    nothing of N*V elements (the reference saves the (N, V) log-softmax, N*V*b).
  transient in forward: one (chunk, V) logits buffer (chunk*V*b), plus on the torch path a
    float32 copy of it for 16-bit dtypes; for 16-bit dtypes with grad_w, a float32 (V, D)
    accumulator and one (V, D) product per chunk.
FLOPs: forward 2*N*V*D for the logits, plus 2*N*V*D for gh (when grad_h) and 2*N*V*D for
gw (when grad_w) -- the same two matmuls a plain linear + cross-entropy does in its
backward, moved into forward; backward is N*D + V*D multiplies. Softmax: O(N*V).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from effc.kernels import math_dtype

IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index


def linear_cross_entropy_ref(h: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """Sum of the cross-entropy of F.linear(h, w) (B, T, V) against targets (B, T), -100 ignored."""
    return F.cross_entropy(F.linear(h, w).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def default_chunk(n: int, d: int, v: int, element_size: int) -> int:
    """Rows per chunk so that a float32 (chunk, V) logits block is about the size of h
    (n*d elements of element_size bytes); at least 1, at most n."""
    return max(1, min(n, n * d * element_size // max(1, v * 4)))


def ce_rows_torch_(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The torch twin of the Triton `ce_rows_`: per-row loss (n,) in math_dtype (0 for an
    ignored row), and `logits` (n, V) overwritten in place with softmax - onehot (zero rows
    for ignored targets). 16-bit logits are processed in a float32 copy."""
    lf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    keep = targets != ignore_index
    t = torch.where(keep, targets, 0).unsqueeze(1)
    x_t = lf.gather(1, t).squeeze(1)
    m = lf.amax(1, keepdim=True)
    e = lf.sub_(m).exp_()  # in place: lf is logits, or its float32 copy
    s = e.sum(1, keepdim=True)
    loss = torch.where(keep, (m + s.log()).squeeze(1) - x_t, 0.0)
    e.div_(s).scatter_add_(1, t, -keep.to(e.dtype).unsqueeze(1)).masked_fill_(~keep.unsqueeze(1), 0.0)
    if e is not logits:
        logits.copy_(e)
    return loss


def linear_cross_entropy_torch(h: Tensor, w: Tensor, targets: Tensor, chunk: int, grad_h: bool, grad_w: bool,
                               rows_: Callable[[Tensor, Tensor], Tensor] = ce_rows_torch_
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """The chunked loop; `rows_(logits_c, targets_c)` returns the rows' losses and turns
    logits_c into softmax - onehot in place (ce_rows_torch_, or the Triton ce_rows_)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if h.dtype != w.dtype:
        raise TypeError(f"h and w must have one dtype, got {h.dtype} and {w.dtype}")
    D, V = h.shape[-1], w.shape[0]
    h2, t = h.reshape(-1, D), targets.reshape(-1)
    N = h2.shape[0]
    sd = math_dtype(h.dtype)
    loss = torch.zeros((), dtype=sd, device=h.device)
    gh = torch.empty(N, D, dtype=h.dtype, device=h.device) if grad_h else h.new_empty(0)
    low = h.dtype not in (torch.float32, torch.float64)  # 16-bit: accumulate gw in float32
    gw_acc = torch.zeros(V, D, dtype=torch.float32 if low else w.dtype, device=w.device) if grad_w else None
    wt = w.t()
    for i in range(0, N, chunk):
        h_c = h2[i:i + chunk]
        logits = torch.mm(h_c, wt)  # (rows, V): the only N x V-sized work, one chunk of it
        loss += rows_(logits, t[i:i + chunk]).sum()
        if grad_h:
            torch.mm(logits, w, out=gh[i:i + chunk])
        if grad_w:
            if low:
                gw_acc += torch.mm(logits.t(), h_c)
            else:
                gw_acc.addmm_(logits.t(), h_c)
        del logits
    gh = gh.view(h.shape) if grad_h else gh
    gw = gw_acc.to(w.dtype) if grad_w else w.new_empty(0)
    return loss, gh, gw


@torch.library.custom_op("effc::linear_cross_entropy", mutates_args=())
def _linear_ce(h: Tensor, w: Tensor, targets: Tensor, chunk: int, grad_h: bool, grad_w: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    return linear_cross_entropy_torch(h, w, targets, chunk, grad_h, grad_w)


@_linear_ce.register_kernel("cuda")
def _(h, w, targets, chunk, grad_h, grad_w):
    from effc.kernels.triton import cross_entropy as T

    def rows_(logits, t):
        return T.ce_rows_(logits, t) if T.supports(logits, t) else ce_rows_torch_(logits, t)

    return linear_cross_entropy_torch(h, w, targets, chunk, grad_h, grad_w, rows_)


@_linear_ce.register_fake
def _(h, w, targets, chunk, grad_h, grad_w):
    loss = h.new_empty((), dtype=math_dtype(h.dtype))
    return (loss, torch.empty_like(h, memory_format=torch.contiguous_format) if grad_h else h.new_empty(0),
            torch.empty_like(w, memory_format=torch.contiguous_format) if grad_w else w.new_empty(0))


def _setup(ctx, inputs, output):
    _, _, _, _, grad_h, grad_w = inputs
    ctx.grad_h, ctx.grad_w = grad_h, grad_w
    ctx.set_materialize_grads(False)  # no zero (N, D) and (V, D) gradients for the gh, gw outputs
    # gh (N, D) and gw (V, D), each only when computed (None keeps nothing)
    ctx.save_for_backward(output[1] if grad_h else None, output[2] if grad_w else None)


def _backward(ctx, g, _gh, _gw):
    gh, gw = ctx.saved_tensors
    if g is None:  # the loss was not used, only gh or gw (which carry no gradient)
        return None, None, None, None, None, None
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if (need_h and not ctx.grad_h) or (need_w and not ctx.grad_w):
        raise RuntimeError("effc::linear_cross_entropy: a gradient is needed for an input whose grad_h/grad_w "
                           "flag was False, so it was not computed in forward (call linear_cross_entropy)")
    return (gh * g if need_h else None), (gw * g if need_w else None), None, None, None, None


_linear_ce.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, chunk: int | None = None) -> Tensor:
    """Sum over the non-ignored targets of cross_entropy(h @ w^T, targets): h (B, T, D),
    w (V, D), targets (B, T) int64 with -100 ignored; a 0-dim float32 (float64) loss.
    Gradients flow to h and w (whichever require grad, when grad is enabled)."""
    grad = torch.is_grad_enabled()
    if chunk is None:
        chunk = default_chunk(h.numel() // max(1, h.shape[-1]), h.shape[-1], w.shape[0], h.element_size())
    return torch.ops.effc.linear_cross_entropy(h, w, targets, chunk, grad and h.requires_grad,
                                               grad and w.requires_grad)[0]

# Under torch.autocast (a bf16 plan) the head's matmuls run in bf16, as F.linear would;
# the softmax statistics stay float32 inside the op.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("effc::linear_cross_entropy", _device, torch.bfloat16)
