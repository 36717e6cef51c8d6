"""Distillation: `train M on D (distill_from=T@stage, temperature=t)`.

Recovery fine-tuning after compression (Hinton et al. 2015, arXiv:1503.02531): the
student learns the teacher's next-token distributions instead of the data's tokens. The
loss of a target position is KL(p_T || p_S) between the teacher's and the student's
softmax at temperature t, times t² so its gradient keeps the scale of the
cross-entropy's; the training loop divides the sum over target positions by their
count, as it does the cross-entropy. The teacher runs in eval mode under no_grad, on the
same tokens (and packing) as the student. In eval mode the student's graph returns its
ordinary summed cross-entropy, so evaluations during and after training read as usual.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from effc.compiler.swaps import KERNELS as SWAP_KERNELS
from effc.compiler.to_fx import IGNORE, loss_sum


def kl_sum(student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, targets_BT: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """Σ over target positions of t² · KL(softmax(teacher/t) || softmax(student/t))."""
    keep = targets_BT != IGNORE
    s = F.log_softmax(student_BTV[keep].float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_BTV[keep].float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature ** 2


# The kernel swaps a student's graph may have: all but the fused head + loss, since the
# KL loss replaces the cross-entropy and reads the logits.
KERNELS = tuple(k for k in SWAP_KERNELS if k != "linear_cross_entropy")


class DistillLoss(nn.Module):
    def __init__(self, teacher: fx.GraphModule, temperature: float):
        super().__init__()
        self.teacher, self.temperature = teacher.requires_grad_(False).eval(), temperature

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's dropout never runs
        return self

    def forward(self, logits_BTV, targets_BT, tokens_BT, segments_BT=None, positions_BT=None):
        if not self.training:
            return loss_sum(logits_BTV, targets_BT)
        with torch.no_grad():
            teacher_BTV = self.teacher(tokens_BT, segments_BT, positions_BT)
        return kl_sum(logits_BTV, teacher_BTV, targets_BT, self.temperature)


def attach(student: fx.GraphModule, teacher: fx.GraphModule, temperature: float) -> fx.GraphModule:
    """The student's loss graph with its cross-entropy node replaced by DistillLoss
    (`teacher` is a logits graph, `to_fx(..., output="logits")`); changes `student`."""
    g = student.graph
    loss = next((n for n in g.nodes if n.op == "call_function" and n.target is loss_sum), None)
    if loss is None:
        raise ValueError("the student's graph has a fused head and loss (the linear_cross_entropy kernel) and no "
                         "logits to distill: build it with kernels=distill.KERNELS")
    inputs = {n.name: n for n in g.nodes if n.op == "placeholder"}
    student.add_submodule("distill", DistillLoss(teacher, temperature))
    with g.inserting_after(loss):
        new = g.call_module("distill", (*loss.args, inputs["tokens"], inputs["segments"], inputs["positions"]))
    loss.replace_all_uses_with(new)
    g.erase_node(loss)
    g.lint()
    student.recompile()
    return student
