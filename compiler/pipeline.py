"""compile_checked: a checked program -> one costed, planned IR per `train` step, read
top to bottom.

Each `train` statement trains the model as it is at that statement: the model's IR,
rewritten by the passes below with the adapters declared before the statement (in this
or an earlier stage). Its execution plan is searched (effc.compiler.search): the fastest
plan, by the device profile's predicted step time, whose predicted peak memory per
process fits the file's `budget(memory=...)` (or `--memory`); fields the user pinned
(`--plan key=value`, `accumulate=` written in the statement) stay as given. When no plan
fits, the diagnostic is at the budget line and names the smallest memory any plan needs.
No stage changes its input; nothing here allocates a weight or imports torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

from effc.compiler.cost import Cost
from effc.compiler.ir import IR, IRError
from effc.compiler.lower import lower_model
from effc.compiler.passes import InternalError, PassContext, PassReport, run_passes
from effc.compiler.passes.apply_adapters import APPLY
from effc.compiler.plan import FIELDS, Plan, PlanError, default_plan, layer_count, overridden  # noqa: F401 (layer_count: re-exported)
from effc.compiler.profile import DeviceProfile, ProfileError, load_profile
from effc.compiler.search import Search, search
from effc.compiler.timing import StepTime
from effc.lang import ast
from effc.lang.check import CheckResult, Step
from effc.lang.diagnostics import Diagnostic, Span, error

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
    memory: int = 0  # predicted peak bytes per process under the plan
    time: StepTime | None = None  # predicted time of one optimizer step under the plan
    search: Search | None = None  # every plan the search costed


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


def _build(result: CheckResult, stage: str, step: Step, overrides: list, budget: int | None, world: int,
           profile: DeviceProfile, searching: bool = True) -> TrainBuild:
    ir, report = model_ir(result, step.model.name, step.span)
    chosen, found = plan_train(result, step, ir, overrides, budget, world, profile, searching)
    return TrainBuild(stage, step, ir, report, chosen.cost, chosen.plan.micro_batch, chosen.plan, chosen.memory,
                      chosen.time, found)


# The last searches plan_train made, by everything their result depends on: `effc run`
# searches at check time and again as it trains, with the same inputs.
_PLANS: OrderedDict[tuple, tuple] = OrderedDict()
PLANS_KEPT = 16


def plan_train(result: CheckResult, step: Step, ir: IR, overrides: list, budget: int | None, world: int,
               profile: DeviceProfile, searching: bool = True):
    """The plan search of one train step (`ir`: its model's IR): (the chosen candidate,
    the search). The chosen plan is the fastest that fits `budget`, or, when none does,
    the one that needs the least memory. The runtime calls this too, so a run executes
    the plan its build chose (the same search, done once: the last few are kept)."""
    seq = result.data[step.data.name].args["seq"]
    # A sentence encoder's micro-batch is `micro` pairs: both sides' activations are held
    # until the contrastive loss, which needs every embedding, runs backward.
    encoder = getattr(result.models[step.model.name].arch, "output", None) == "embedding"
    batch, accumulate = step.options["batch"], step.options["accumulate"]
    key = (hashlib.sha256(ir.to_json().encode()).hexdigest(), batch, accumulate, tuple(sorted(step.given)), seq,
           encoder, tuple(tuple(o) for o in overrides), budget, world,
           json.dumps(dataclasses.asdict(profile), sort_keys=True), searching)
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key]
    # `batch` sequences per optimizer step arrive as `accumulate` micro-batches (the plan's).
    base = overridden(default_plan(batch, accumulate, layer_count(ir), world), overrides)
    pinned = set(FIELDS) if not searching else (
        {k for k, _ in overrides} | ({"accumulate"} if "accumulate" in step.given else set()))
    found = search(ir, base, seq, profile, budget, pinned, 2 if encoder else 1)
    _PLANS[key] = found.best or found.smallest, found
    if len(_PLANS) > PLANS_KEPT:
        _PLANS.popitem(last=False)
    return _PLANS[key]


def _budget_span(result: CheckResult) -> Span:
    return next(i.span for i in result.program.items if isinstance(i, ast.Budget))


# Where a `--memory` budget came from: it replaces the file's budget(memory=...).
COMMAND_LINE = Span("<command line>", 1, 1, 1, 2)


def _over_budget(result: CheckResult, b: TrainBuild, limit: int, memory: int | None = None) -> Diagnostic | None:
    """E0404 when no plan of the step fits: the smallest memory any plan needs, its plan
    and its largest part."""
    if b.search is None or b.search.best is not None:
        return None
    s = b.search.smallest
    parts = s.parts()
    largest = max(parts, key=parts.get)
    searched = (f"none of the {b.search.evaluated} execution plans searched fits" if b.search.searched
                else "the execution plan, as pinned, does not fit")
    return error("E0404", f"'train {b.step.model.name}' (stage {b.stage}, line {b.step.span.line}) needs at least "
                 f"{_gib(s.memory)} per process, over the budget of {_gib(limit)}"
                 + (" (--memory)" if memory is not None else "") + f": {searched}",
                 COMMAND_LINE if memory is not None else _budget_span(result),
                 f"the smallest plan ({s.plan.describe()}) holds {_gib(parts[largest])} of {largest}; "
                 + _advice(largest))


def _advice(part: str) -> str:
    if part == "activations" or part == "backward temporaries":
        return "a shorter seq or a smaller batch uses less"
    if part in ("gradients", "optimizer state"):
        return "adapters instead of full training use less (or more processes with --plan shard=zero3)"
    return "a quantized base (quantize ... to int4()) uses less, or more processes with --plan shard=zero3"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}GiB" if n >= 2**28 else f"{n / 2**20:.1f}MiB"


def compile_checked(result: CheckResult, plan: list[tuple[str, str]] | None = None,
                    memory: int | None = None, world: int | None = None, searching: bool = True,
                    profile: DeviceProfile | None = None) -> Compiled:
    """Build, cost and plan every train step of a program that checked without errors.
    `plan` holds `--plan key=value` overrides of every step's execution plan, `memory` a
    `--memory` budget in bytes that replaces the file's budget(memory=...), `world` the
    data-parallel processes (default: the budget's devices x nodes); `searching=False`
    keeps the statement's own plan (with the overrides) instead of searching. `profile`:
    the device profile (default: this machine's, effc.compiler.profile.load_profile)."""
    if not result.ok:
        raise ValueError("compile_checked needs a program that checked without errors")
    budget = result.budget or {}
    limit = memory if memory is not None else (budget["memory"].n if budget.get("memory") is not None else None)
    if world is None:
        world = budget.get("devices", 1) * budget.get("nodes", 1)
    if profile is None:
        try:
            profile = load_profile()
        except ProfileError as e:
            return Compiled((), (error("E0115", e.message, Span(e.path or "<profile>", 1, 1, 1, 2), e.hint),))
    builds, diags = [], []
    for stage in result.stages:
        for step in stage.steps:
            if step.kind != "train":
                continue
            try:
                b = _build(result, stage.name, step, list(plan or ()), limit, world, profile, searching)
            except (InternalError, IRError) as exc:  # a compiler bug, reported, never raised
                diags.append(error("E9001", str(exc), step.span, "please report this with the .eff file"))
                continue
            except PlanError as exc:  # the same overrides fail every step: say it once
                return Compiled((), (error("E0112", exc.message, Span("<command line>", 1, 1, 1, 2), exc.hint),))
            builds.append(b)
            if limit is not None and (d := _over_budget(result, b, limit, memory)) is not None:
                diags.append(d)
    return Compiled(tuple(builds), tuple(diags))
