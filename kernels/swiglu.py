"""SwiGLU (Shazeer 2020, arXiv:2002.05202): silu(gate) * up.

`swiglu` saves only its two inputs and recomputes the sigmoid in backward, as the cost
model assumes; the reference `swiglu_ref` keeps silu(gate) as well.
Bytes: reads gate and up (2*N*F), writes the product (N*F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        # In place where possible: one temporary (the sigmoid) beside the two input
        # gradients, so backward holds 4 tensors of the gate's size including g.
        sig = torch.sigmoid(gate)
        g_up = (gate * sig).mul_(g)  # silu(gate) * g
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        g_gate = torch.sub(1, sig).mul_(gate).add_(1).mul_(sig).mul_(g).mul_(up)
        return g_gate, g_up

def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)
