"""assign_roles: set every param's trainable flag from what the IR holds.

The policy of this issue: a model without adapters trains everything; a model with
adapters trains only them (LoRA's frozen base, Hu et al. 2021), each adapter param as
its kind made it; a quantized weight never trains (SVFit's singular vectors and NOLA's bases stay frozen). The pass is idempotent,
so running it after the `apply_<kind>` passes rewrites nothing; a rewrite is one flag changed.
"""

from __future__ import annotations

from dataclasses import replace

from effc.compiler.adapters import KINDS
from effc.compiler.ir import ADAPTERS, IR
from effc.compiler.passes import PassContext, register


def set_trainable(ir: IR) -> tuple[IR, int]:
    adapted = any(n.op in ADAPTERS for n in ir.nodes())
    # A quantized weight's packed tensors are frozen whatever trains (QLoRA's base); a QAT
    # step always trains (LSQ alone, or beside LoRA as in L4Q).
    return ir.map_params(lambda p: p if p.role == "adapter" else replace(
        p, trainable=(not adapted and not p.quantized) or (p.storage.startswith("qat") and p.path.endswith(".step"))))


@register("assign_roles", after=tuple(f"apply_{k}" for k in sorted(KINDS)))
def assign_roles(ir: IR, ctx: PassContext) -> tuple[IR, int]:
    return set_trainable(ir)
