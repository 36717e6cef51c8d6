"""compile_checked: a checked program -> one costed IR per `train` step, read top to bottom.

Each `train` statement trains the model as it is at that statement: the model's IR,
rewritten by the passes below with the adapters declared before the statement (in this
or an earlier stage), and costed for one optimizer micro-batch of the statement's data.
A predicted peak above the file's `budget(memory=...)` is a diagnostic at the budget line.
No stage changes its input; nothing here allocates a weight or imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from effc.compiler.cost import Cost, estimate
from effc.compiler.ir import IR, IRError
from effc.compiler.lower import lower_model
from effc.compiler.passes import InternalError, PassContext, PassReport, run_passes
from effc.compiler.passes.apply_adapters import APPLY
from effc.compiler.plan import Plan, PlanError, default_plan, overridden
from effc.lang import ast
from effc.lang.check import CheckResult, Step
from effc.lang.diagnostics import Diagnostic, Span, error
from effc.lang.types import Bytes

# The pass list, in order, each with its reason.
PASSES = [
    "share_layers",     # recursive shares first: later layers tie their params to their blocks'
    "prune_structure",  # removed heads and channels shrink their tensors before anything adapts them
    "drop_sublayers",   # dropped attention or MLP sublayers leave the graph
    *APPLY,             # adapters declared so far become adapter nodes, one pass per kind; the base is frozen
    "share_adapters",   # a shared adapter on a looped layer is its block's adapter
    "prune_weights",    # pruned weights keep their zeros (storage sparse)
    "quantize_linear",  # quantized weights become their packed, frozen tensors
    "assign_roles",     # trainable flags: everything when no adapter exists, never a quantized weight
]


@dataclass(frozen=True)
class TrainBuild:
    stage: str
    step: Step
    ir: IR
    report: PassReport
    cost: Cost
    micro_batch: int
    plan: Plan  # how the step is computed (effc.compiler.plan); the runtime realises it


@dataclass(frozen=True)
class Compiled:
    builds: tuple[TrainBuild, ...]
    diagnostics: tuple[Diagnostic, ...]


def _before(a: Span, b: Span) -> bool:
    return (a.line, a.col) < (b.line, b.col)


def model_ir(result: CheckResult, name: str, until: Span | None) -> tuple[IR, PassReport]:
    """Model `name` as it is just before `until` (None: after every stage): its IR
    rewritten with the adapters and edits (share, prune, quantize) declared before that point."""
    info = result.models[name]
    adapters = tuple(u for u in info.adapters if until is None or _before(u.span, until))
    edits = tuple(e for e in info.edits if until is None or _before(e.span, until))
    return run_passes(lower_model(info), PASSES, PassContext(adapters, edits))


def snapshot_until(result: CheckResult, stage: str) -> Span | None:
    """Where `M@stage` is taken: the start of the next stage (None after the last)."""
    names = [s.name for s in result.stages]
    i = names.index(stage)
    return result.stages[i + 1].span if i + 1 < len(names) else None


def _build(result: CheckResult, stage: str, step: Step, overrides: list) -> TrainBuild:
    ir, report = model_ir(result, step.model.name, step.span)
    seq = result.data[step.data.name].args["seq"]
    # A sentence encoder's micro-batch is `micro` pairs: both sides' activations are held
    # until the contrastive loss, which needs every embedding, runs backward.
    encoder = getattr(result.models[step.model.name].arch, "output", None) == "embedding"
    # `batch` sequences per optimizer step arrive as `accumulate` micro-batches (the plan's).
    plan = overridden(default_plan(step.options["batch"], step.options["accumulate"], layer_count(ir)), overrides)
    micro = plan.micro_batch
    cost = estimate(ir, 2 * micro if encoder else micro, seq, checkpoint=plan.checkpoint, kernels=plan.kernels,
                    precision=plan.precision)
    return TrainBuild(stage, step, ir, report, cost, micro, plan)


def layer_count(ir: IR) -> int:
    """The transformer layers of an IR (ids `layers[i]...`)."""
    return len({n.id.split("]", 1)[0] for n in ir.nodes() if n.id.startswith("layers[")})


def _budget_span(result: CheckResult) -> Span:
    return next(i.span for i in result.program.items if isinstance(i, ast.Budget))


# Where a `--memory` budget came from: it replaces the file's budget(memory=...).
COMMAND_LINE = Span("<command line>", 1, 1, 1, 2)


def _over_budget(result: CheckResult, b: TrainBuild, memory: int | None = None) -> Diagnostic | None:
    limit = Bytes(memory) if memory is not None else result.budget["memory"]
    c = b.cost
    if c.peak_bytes <= limit.n:
        return None
    parts = {"weights": c.weight_bytes, "gradients": c.grad_bytes, "optimizer state": c.optimizer_bytes,
             "activations": c.activation_bytes, "logits and their gradient": c.transient_bytes}
    largest = max(parts, key=parts.get)
    return error("E0404", f"predicted peak memory {_gib(c.peak_bytes)} of 'train {b.step.model.name}' "
                 f"(stage {b.stage}, line {b.step.span.line}) exceeds the budget of {_gib(limit.n)}"
                 + (" (--memory)" if memory is not None else ""),
                 COMMAND_LINE if memory is not None else _budget_span(result),
                 f"the largest part is {largest} ({_gib(parts[largest])}); a smaller batch per micro-batch "
                 f"(now {b.micro_batch}: raise accumulate=) or adapters instead of full training use less")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB" if n >= 2**28 else f"{n / 2**20:.1f}MiB"


def compile_checked(result: CheckResult, plan: list[tuple[str, str]] | None = None,
                    memory: int | None = None) -> Compiled:
    """Build and cost every train step of a program that checked without errors; `plan`
    holds `--plan key=value` overrides of every step's execution plan, `memory` a
    `--memory` budget in bytes that replaces the file's budget(memory=...)."""
    if not result.ok:
        raise ValueError("compile_checked needs a program that checked without errors")
    builds, diags = [], []
    for stage in result.stages:
        for step in stage.steps:
            if step.kind != "train":
                continue
            try:
                b = _build(result, stage.name, step, list(plan or ()))
            except (InternalError, IRError) as exc:  # a compiler bug, reported, never raised
                diags.append(error("E9001", str(exc), step.span, "please report this with the .eff file"))
                continue
            except PlanError as exc:  # the same overrides fail every step: say it once
                return Compiled((), (error("E0112", exc.message, Span("<command line>", 1, 1, 1, 2), exc.hint),))
            builds.append(b)
            if (result.budget is not None or memory is not None) and (d := _over_budget(result, b, memory)) is not None:
                diags.append(d)
    return Compiled(tuple(builds), tuple(diags))
