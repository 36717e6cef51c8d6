"""LoRA linear (Hu et al. 2021, arXiv:2106.09685): y = x W^T + bias + scale * (xd A^T) B^T.

W (out, in) is the base weight (usually frozen), A (r, in) and B (out, r) the adapter,
scale = alpha / r, and xd the adapter's input after dropout; dropout is applied by the
caller, outside the op, and xd=None means the adapter reads x itself.

`lora_linear_ref` is the reference: the composed formula. Autograd keeps the same
activations for it (x and xa), but it makes three (..., out) tensors in forward (x W^T + b,
xa B^T, its scaled copy) before the sum, and in backward g * scale and a second (..., in)
input gradient that is then added to the first. It is also the pattern the compiler's
kernel swap looks for, so it stays this simple.

`lora_linear` is the kernel: the custom op `effc::lora_linear` (fake kernel, autograd, CPU
kernel; the CUDA kernel is Triton, `effc.kernels.triton.lora`). It returns y and the
low-rank activation xa = xd A^T (..., r, in x's dtype, not differentiable), which B's
gradient needs. The CPU path is two
matmuls on the 2-D views: y = addmm(bias, x, W^T), then xa B^T added into y in place with
the scale as addmm_'s alpha, so no (..., out) temporary is made; the r-wide products
are computed transposed (`_narrow_mm`), which is several times faster on CPU. Backward
(`effc::lora_linear_backward`) keeps what the requested gradients need and nothing else:
x when W needs a gradient (or when it is also the adapter's input and A needs one), xd
when it was given and A needs a gradient, xa when B needs one, and the parameters, which
are held anyway; never y. When xd is None the adapter's input gradient
scale * (g B) A is accumulated into grad x's buffer by an in-place addmm_. Measured on
this CPU (1 thread, x 2048 x 512, W 512 x 512 frozen, r = 8), the other formulations tried
(merging W + scale B A into one matmul, adding xa B^T out of place, scaling B first) were
no faster; merging would also round the adapter's update away in bfloat16.

FLOPs, N rows: forward 2 N in out + 2 N r (in + out); backward 2 N in out for grad x and
again for grad W (only if W is trainable), 2 N r out for g B, 2 N r in each for grad A and
the adapter's input gradient, 2 N r out for grad B.
Bytes: forward reads x (N in), W (out in), A, B, writes y (N out) and xa (N r); saved for
backward: N (in + r) with W frozen, plus N in more when xd is given and W is trainable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_linear_ref(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float,
                    xd: Tensor | None = None) -> Tensor:
    return F.linear(x, w, bias) + F.linear(F.linear(x if xd is None else xd, a), b) * scale


def _narrow_mm(m1: Tensor, m2: Tensor, scale: float = 1.0) -> Tensor:
    """scale * (m1 @ m2) for a product with r (narrow) columns, computed as its transpose
    m2^T m1^T (an (r, N) row-major result; a column-major view is returned), the scale as
    BLAS's alpha. On torch 2.13's CPU build, 1 thread, (2048 x 512) @ (512 x 8) takes
    0.4 ms this way against 0.6-1.4 ms directly, and the row sum g^T xa 0.4 ms against
    4 ms."""
    return torch.addmm(m1.new_zeros(()), m2.t(), m1.t(), beta=0, alpha=scale).t()


def lora_forward_torch(x: Tensor, xd: Tensor | None, w: Tensor, bias: Tensor | None, a: Tensor,
                       b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The CPU path: (y (..., out), xa (..., r)); two matmuls and one in-place low-rank update."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xin2 = x2 if xd is None else xd.reshape(-1, xd.shape[-1])
    xa = _narrow_mm(xin2, a.t()).contiguous()
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    y.addmm_(xa, b.t(), alpha=scale)
    return y.view(*lead, w.shape[0]), xa.view(*lead, a.shape[0])


def lora_backward_torch(g: Tensor, x: Tensor | None, xd: Tensor | None, w: Tensor, a: Tensor,
                        b: Tensor, xa: Tensor | None, scale: float, has_xd: bool, need_x: bool,
                        need_xd: bool, need_w: bool, need_bias: bool, need_a: bool, need_b: bool
                        ) -> tuple[Tensor | None, ...]:
    """(grad x, grad xd, grad W, grad bias, grad A, grad B), None where not asked for.

    x is needed for grad W (and for grad A when has_xd is False), xd for grad A when
    has_xd, xa for grad B. Without xd the low-rank input gradient goes into grad x."""
    lead, n_in = g.shape[:-1], w.shape[1]
    g2 = g.reshape(-1, g.shape[-1])
    gx = gxd = gw = gbias = ga = gb = None
    lowrank_in = need_xd if has_xd else need_x
    gbs = None  # scale * g B, (N, r)
    if lowrank_in or need_a:
        gbs = _narrow_mm(g2, b, scale)
    if need_x:
        gx = torch.mm(g2, w)
        if not has_xd:
            gx.addmm_(gbs, a)
        gx = gx.view(*lead, n_in)
    if need_xd:
        gxd = torch.mm(gbs, a).view(*lead, n_in)
    if need_w:
        gw = torch.mm(g2.t(), x.reshape(-1, n_in)).to(w.dtype)
    if need_bias:
        gbias = g2.sum(0)
    if need_a:
        xin = xd if has_xd else x
        ga = torch.mm(gbs.t(), xin.reshape(-1, n_in)).to(a.dtype)
    if need_b:
        gb = _narrow_mm(g2.t(), xa.reshape(-1, a.shape[0]), scale).contiguous().to(b.dtype)
    return gx, gxd, gw, gbias, ga, gb


@torch.library.custom_op(
    "effc::lora_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor? xd, Tensor w, Tensor? bias, Tensor a, Tensor b, float scale) -> (Tensor, Tensor)",
)
def _lora_linear(x, xd, w, bias, a, b, scale):
    return lora_forward_torch(x, xd, w, bias, a, b, scale)


@_lora_linear.register_kernel("cuda")
def _(x, xd, w, bias, a, b, scale):
    from effc.kernels.triton import lora as T

    if not T.supports(x, xd, w, bias, a, b) or x.shape[-1] != w.shape[1]:
        return lora_forward_torch(x, xd, w, bias, a, b, scale)
    return T.lora_fwd(x, xd, w, bias, a, b, scale)


@_lora_linear.register_fake
def _(x, xd, w, bias, a, b, scale):
    lead = x.shape[:-1]
    return x.new_empty((*lead, w.shape[0])), x.new_empty((*lead, a.shape[0]))


@torch.library.custom_op(
    "effc::lora_linear_backward",
    mutates_args=(),
    schema="(Tensor g, Tensor? x, Tensor? xd, Tensor w, Tensor a, Tensor b, Tensor? xa, float scale, "
    "bool has_xd, bool need_x, bool need_xd, bool need_w, bool need_bias, bool need_a, bool need_b) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _lora_linear_backward(g, x, xd, w, a, b, xa, scale, has_xd, need_x, need_xd, need_w, need_bias, need_a,
                          need_b):
    return lora_backward_torch(g, x, xd, w, a, b, xa, scale, has_xd, need_x, need_xd, need_w, need_bias,
                               need_a, need_b)


@_lora_linear_backward.register_kernel("cuda")
def _(g, x, xd, w, a, b, xa, scale, has_xd, need_x, need_xd, need_w, need_bias, need_a, need_b):
    from effc.kernels.triton import lora as T

    args = (g, x, xd, w, a, b, xa, scale, has_xd, need_x, need_xd, need_w, need_bias, need_a, need_b)
    if not T.supports(g, x, xd, w, a, b, xa):
        return lora_backward_torch(*args)
    return T.lora_bwd(*args)


@_lora_linear_backward.register_fake
def _(g, x, xd, w, a, b, xa, scale, has_xd, need_x, need_xd, need_w, need_bias, need_a, need_b):
    gin = g.new_empty((*g.shape[:-1], w.shape[1]))
    return (gin if need_x else None, torch.empty_like(gin) if need_xd else None,
            w.new_empty(w.shape) if need_w else None, g.new_empty(g.shape[-1:]) if need_bias else None,
            a.new_empty(a.shape) if need_a else None, b.new_empty(b.shape) if need_b else None)


def _setup(ctx, inputs, output):
    x, xd, w, bias, a, b, scale = inputs
    ni = ctx.needs_input_grad
    has_xd = xd is not None
    ctx.needs = (ni[0], has_xd and ni[1], ni[2], bias is not None and ni[3], ni[4], ni[5])
    need_w, need_a, need_b = ni[2], ni[4], ni[5]
    ctx.has_xd, ctx.scale = has_xd, scale
    ctx.bias_dtype = bias.dtype if bias is not None else None
    keep_x = need_w or (need_a and not has_xd)
    ctx.mark_non_differentiable(output[1])  # xa is kept for backward, not a result to train through
    ctx.save_for_backward(x if keep_x else None, xd if has_xd and need_a else None, w, a, b,
                          output[1] if need_b else None)


def _backward(ctx, gy, _gxa):
    x, xd, w, a, b, xa = ctx.saved_tensors
    gx, gxd, gw, gbias, ga, gb = torch.ops.effc.lora_linear_backward(
        gy.contiguous(), x, xd, w, a, b, xa, ctx.scale, ctx.has_xd, *ctx.needs)
    if gbias is not None:
        gbias = gbias.to(ctx.bias_dtype)
    return gx, gxd, gw, gbias, ga, gb, None


_lora_linear.register_autograd(_backward, setup_context=_setup)


def lora_linear(x: Tensor, w: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scale: float,
                xd: Tensor | None = None) -> Tensor:
    """y = x W^T + bias + scale * (xd A^T) B^T, xd = x when None (dropout applied by the caller)."""
    return torch.ops.effc.lora_linear(x, xd, w, bias, a, b, scale)[0]

# Under torch.autocast (a bf16 plan) the op runs in the autocast dtype, as F.linear would:
# its floating inputs are cast to it, and autograd casts the gradients back.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("effc::lora_linear", _device, torch.bfloat16)
