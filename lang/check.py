"""The checker: every mistake in a `.eff` file, found before anything runs.

`check(program)` walks the declarations in file order (stages run in order, so the order
of the text is the order of time), evaluates params, checks every call against its
registry signature and every selector against the model's module tree *as it is at that
statement*, and collects all diagnostics before returning. It never raises on bad input;
a crash inside it is reported as an internal error (E9001).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from effc.lang import ast, registry as R
from effc.lang.compress import adapter_problem, edit_problem
from effc.lang.diagnostics import Diagnostic, Span, error, has_errors, sort_diagnostics, warning
from effc.lang.parser import MAX_DIGITS, parse
from effc.lang.peft import PeftConfigError, module_name, peft_uses
from effc.lang.tree import KINDS, Arch, ModelCatalog, Module, Selected, default_catalog, join, walk
from effc.lang.types import (
    BoolT, Bytes, CallT, DataT, Entry, EnumT, FloatT, IntT, ListT, ModelT, PathT, Registry, SizeT,
    StrT, TokenizerT, _range,
)

# ---------------------------------------------------------------- values


class _Bad:
    """A value whose error has been reported already; it silences follow-on errors."""

    def __repr__(self) -> str:
        return "<bad>"


BAD: Any = _Bad()


@dataclass(frozen=True)
class Bare:
    """A bare name that is not a declaration: an enum choice, or a mistake."""

    name: str
    span: Span


@dataclass(frozen=True)
class Ref:
    """A reference to a declared model or data (with a snapshot stage or a data split)."""

    kind: str  # "model" | "data"
    name: str
    stage: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class CallValue:
    """A checked call: the registry entry's name and its bound, typed arguments."""

    name: str
    args: dict


@dataclass
class AdapterUse:
    technique: str
    scope: str  # adapters of one kind compose only across scopes (shared vs per-loop)
    paths: frozenset[str]
    span: Span
    args: dict = field(default_factory=dict)  # the technique's checked arguments, defaults filled


@dataclass
class EditUse:
    """A `share`, `tie`, `prune` or `quantize` statement: a one-shot change of the model's
    weights (and IR) at that point of the pipeline."""

    verb: str
    technique: str
    paths: tuple[str, ...]  # the targets in selection order (share: the blocks, layers[i])
    span: Span
    args: dict = field(default_factory=dict)


@dataclass
class ModelInfo:
    name: str
    family: str | None
    args: dict
    tree: Module | None
    span: Span
    adapters: list[AdapterUse] = field(default_factory=list)
    edits: list[EditUse] = field(default_factory=list)  # share/tie/prune/quantize, in declaration order
    arch: Arch | None = None  # what the compiler lowers (None when the tree came without one)
    merge: "MergeInfo | None" = None  # a model made by merging snapshots (ties(...), ...)


@dataclass
class MergeInfo:
    """`model soup = ties(a@s1, b@s2, base=a@s0, density=0.5)`: the merge, its operand
    snapshots in order, and its other arguments (base among them)."""

    technique: str
    operands: list[Ref]
    args: dict


@dataclass
class DataInfo:
    name: str
    source: str | None
    args: dict
    span: Span


@dataclass
class Step:
    """A checked `train`, `eval` or `export` statement, as the compiler and runtime read it.
    `model` and `data` are references (`Ref`); `options` has every default filled in."""

    kind: str
    model: Ref
    options: dict
    span: Span
    data: Ref | None = None
    path: str | None = None  # export: the folder, as written (relative to the .eff file)
    edit: EditUse | None = None  # share/tie/prune/quantize: what the statement does
    given: frozenset = frozenset()  # the options written in the statement (the others are defaults)


@dataclass
class StageInfo:
    name: str
    steps: list[Step]
    span: Span


@dataclass
class CheckResult:
    """What the compiler needs from the front end: the program and everything resolved."""

    program: ast.Program | None
    diagnostics: list[Diagnostic]
    source: str
    params: dict[str, Any] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    data: dict[str, DataInfo] = field(default_factory=dict)
    budget: dict | None = None
    stages: list[StageInfo] = field(default_factory=list)
    exports: list[Step] = field(default_factory=list)  # top-level exports, after every stage

    @property
    def ok(self) -> bool:
        return self.program is not None and not has_errors(self.diagnostics)


def _nearest(name: str, options, n: int = 1) -> list[str]:
    """Close spellings first; failing that, an option that is the name's first word
    ('q_prj' -> 'q') or that the name abbreviates ('val' -> 'validation')."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=n, cutoff=0.6)
    if close or not name:
        return close
    head = name.split("_")[0]
    return [o for o in options if o == head or o.startswith(name)][:n]


def _did_you_mean(name: str, options, what: str) -> str:
    options = sorted(set(options))
    near = _nearest(name, options)
    listing = ", ".join(options) if options else "none"
    return (f"did you mean '{near[0]}'? " if near else "") + f"({what}: {listing})"


def _describe(v: Any) -> str:
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"the integer {v}"
    if isinstance(v, float):
        return f"the number {v:g}"
    if isinstance(v, Bytes):
        return f"the size {v}"
    if isinstance(v, str):
        return f'the string "{v}"'
    if isinstance(v, list):
        return "a list"
    if isinstance(v, ast.Call):
        return f"a call to {v.func.name}(...)"
    if isinstance(v, Ref):
        return f"the {v.kind} '{v.name}'" + (f"@{v.stage}" if v.stage else "")
    if isinstance(v, Bare):
        return f"the name '{v.name}'"
    return "a value"


# ---------------------------------------------------------------- the checker


class _Checker:
    def __init__(self, program: ast.Program, catalog: ModelCatalog, base_dir: str,
                 overrides: dict[str, ast.Expr]):
        self.program = program
        self.catalog = catalog
        self.base_dir = base_dir
        self.overrides = overrides
        self.diags: list[Diagnostic] = []
        self.declared: dict[str, tuple[str, Span]] = {}  # name -> (kind, span), so far
        self.later: dict[str, tuple[str, Span]] = {}  # every declaration in the file
        self.params: dict[str, Any] = {}
        self.models: dict[str, ModelInfo] = {}
        self.data: dict[str, DataInfo] = {}
        self.used: set[str] = set()
        self.stages: dict[str, ast.Stage] = {}
        self.done: dict[str, set[str]] = {}  # finished stage -> models that existed then
        self.budget: dict | None = None
        self.stage_infos: list[StageInfo] = []
        self.exports: list[Step] = []
        self.choices = R.enum_choices()

    def err(self, code: str, message: str, span: Span, hint: str | None = None) -> None:
        self.diags.append(error(code, message, span, hint))

    # ------------------------------------------------------------ top level

    def run(self) -> None:
        self.collect()
        seen_pipeline = seen_budget = None
        for item in self.program.items:
            if isinstance(item, ast.Pipeline):
                if seen_pipeline:
                    self.err("E0104", "a second 'pipeline' declaration", item.span,
                             f"the pipeline is already named at line {seen_pipeline.line}")
                seen_pipeline = seen_pipeline or item.span
            elif isinstance(item, ast.Budget):
                if seen_budget:
                    self.err("E0104", "a second 'budget' declaration", item.span,
                             f"merge it into the budget at line {seen_budget.line}")
                else:
                    self.budget = self.options(item.options, R.STATEMENTS["budget"], item.span)
                seen_budget = seen_budget or item.span
            elif isinstance(item, ast.Param):
                self.param(item)
            elif isinstance(item, ast.ModelDecl):
                self.model_decl(item)
            elif isinstance(item, ast.DataDecl):
                self.data_decl(item)
            elif isinstance(item, ast.Stage):
                steps = [step for stmt in item.body if (step := self.statement(stmt)) is not None]
                self.stage_infos.append(StageInfo(item.name.name, steps, item.span))
                self.done[item.name.name] = set(self.models)
            elif isinstance(item, ast.Export):
                step = self.statement(item)
                if step is not None:
                    self.exports.append(step)
        self.unused()

    def collect(self) -> None:
        """Duplicates and shadowing, and the table of later declarations (so that a use
        before a declaration says so instead of 'undefined')."""
        for item in self.program.items:
            if isinstance(item, ast.Stage):
                first = self.stages.get(item.name.name)
                if first:
                    self.err("E0102", f"stage '{item.name.name}' is declared twice", item.name.span,
                             f"the first is at line {first.name.span.line}; rename one")
                else:
                    self.stages[item.name.name] = item
                continue
            kind = {ast.Param: "param", ast.ModelDecl: "model", ast.DataDecl: "data"}.get(type(item))
            if kind is None:
                continue
            name = item.name.name
            if name in self.later:
                k, span = self.later[name]
                self.err("E0102", f"'{name}' is already declared as a {k}", item.name.span,
                         f"the first declaration is at line {span.line}; params, models and data share one namespace")
                continue
            self.later[name] = (kind, item.name.span)
            if kind == "param" and name in self.choices:
                self.err("E0103", f"param '{name}' shadows the choice '{name}' of {self.choices[name]}",
                         item.name.span, "rename the param: a bare name there would be ambiguous")

    def declare(self, name: str, kind: str, span: Span) -> None:
        self.declared.setdefault(name, (kind, span))  # a duplicate is reported by collect()

    def unused(self) -> None:
        for name, (kind, span) in self.declared.items():
            if name not in self.used and kind in ("param", "data"):
                self.diags.append(warning("W0101", f"{kind} '{name}' is never used", span,
                                          "remove it, or use it in a statement"))

    # ------------------------------------------------------------ declarations

    def param(self, item: ast.Param) -> None:
        name = item.name.name
        expr = self.overrides.get(name, item.value)
        value = self.value(expr)
        if isinstance(value, Bare):
            self.undefined(value.name, value.span)
            value = BAD
        elif isinstance(value, (Ref, ast.Call)):
            self.err("E0305", f"a param holds a number, size, string, boolean or list, not {_describe(value)}",
                     expr.span, "declare models with 'model' and data with 'data'")
            value = BAD
        self.declare(name, "param", item.name.span)
        self.params[name] = value

    def model_decl(self, item: ast.ModelDecl) -> None:
        name, call = item.name.name, item.value
        info = ModelInfo(name, None, {}, None, item.span)
        if not isinstance(call, ast.Call):
            self.err("E0313", f"model '{name}' must be declared by a call, not {_describe(self.value(call))}",
                     call.span, "for example: model m = decoder(vocab=512, dim=256, layers=4, heads=4, ffn=704, seq=128)")
        elif call.func.name in R.MERGES.entries:
            self.merge_decl(info, call)
        else:
            checked = self.call(call, R.FAMILIES, also=R.MERGES)
            if checked is not None:
                entry = R.FAMILIES.entries[checked.name]
                info.family, info.args = checked.name, checked.args
                if entry.derive:  # what a checkpoint's config says (vocab, seq, ...)
                    info.args = {**checked.args, **entry.derive(checked.args)}
                info.arch = self.catalog.arch(checked.name, checked.args)
                info.tree = self.catalog.tree(checked.name, checked.args)
        self.declare(name, "model", item.name.span)
        self.models[name] = info

    def merge_decl(self, info: ModelInfo, call: ast.Call) -> None:
        """A merge: positional operands (snapshots of congruent, dense models), keyword
        arguments bound against the merge's entry. The merged model has the operands'
        architecture and starts with no adapters or edits of its own."""
        entry = R.MERGES.entries[call.func.name]
        operands, ok = [], True
        for a in [a for a in call.args if not isinstance(a, ast.KwArg)]:
            v = self.coerce(self.value(a), ModelT(), a.span, a)
            ok = ok and v is not BAD
            operands.append((v, a.span))
        args = self.bind(tuple(a for a in call.args if isinstance(a, ast.KwArg)), entry, call.func.span,
                         "E0303", "E0304", f"{entry.name}(...)")
        if not ok or args is None:
            return
        if len(operands) < entry.min_operands:
            self.err("E0309", f"{entry.name} merges at least {entry.min_operands} snapshots, and "
                     f"{len(operands)} {'is' if len(operands) == 1 else 'are'} given", call.span,
                     f"for example {entry.name}(m@a, m@b" + (", base=m@pretrain" if entry.param("base") else "") + ")")
            return
        weights = args.get("weights")
        if weights is not None and len(weights) != len(operands):
            self.err("E0314", f"weights= has {len(weights)} values for {len(operands)} snapshots",
                     self.arg_span(call, "weights"), "give one weight per snapshot, in order")
            return
        refs = [(r, sp) for r, sp in operands] + ([(args["base"], self.arg_span(call, "base"))] if args.get("base") else [])
        first = self.models[refs[0][0].name]
        for ref, span in refs:
            problem = self.merge_operand_problem(first, ref)
            if problem:
                self.err("E0309", problem[0], span, problem[1])
                return
        info.family, info.args, info.arch, info.tree = first.family, first.args, first.arch, first.tree
        info.merge = MergeInfo(entry.name, [r for r, _ in operands], args)

    def merge_operand_problem(self, first: ModelInfo, ref: Ref) -> tuple[str, str] | None:
        """Snapshots merge element by element: same architecture, dense and unshared weights
        (the adapters they have are folded in first)."""
        model = self.models[ref.name]
        if ref.stage is None:
            return (f"a merge combines snapshots, and '{ref.name}' names the live model",
                    f"name the stage whose result to merge: {ref.name}@stage")
        if model.merge is not None:
            return (f"'{ref.name}' is itself a merge", "merge the snapshots it was made from in one merge")
        if model.arch != first.arch or model.args.get("path") != first.args.get("path"):
            return (f"'{ref.name}' and '{first.name}' are different models: a merge combines snapshots of one "
                    "architecture element by element", "merge snapshots of one model (m@stage)")
        end = self.snapshot_end(ref.stage) if ref.stage else None
        edits = [e for e in model.edits if end is None or (e.span.line, e.span.col) < (end.line, end.col)]
        bad = next((e for e in edits if e.verb in ("quantize", "share")), None)
        if bad:
            return (f"'{ref.name}@{ref.stage}' has {'quantized' if bad.verb == 'quantize' else 'shared'} weights "
                    f"(line {bad.span.line}), and a merge averages dense, per-layer weights",
                    "merge snapshots taken before that statement")
        return None

    def data_decl(self, item: ast.DataDecl) -> None:
        name, call = item.name.name, item.value
        info = DataInfo(name, None, {}, item.span)
        if not isinstance(call, ast.Call):
            self.err("E0313", f"data '{name}' must be declared by a call, not {_describe(self.value(call))}",
                     call.span, 'for example: data corpus = text("data/train.txt", seq=128)')
        else:
            checked = self.call(call, R.DATA_SOURCES)
            if checked is not None:
                info.source, info.args = checked.name, checked.args
        self.declare(name, "data", item.name.span)
        self.data[name] = info

    # ------------------------------------------------------------ statements

    def statement(self, stmt: ast.Stmt) -> Step | None:
        """Check one statement; a train, eval or export without errors is returned as a Step."""
        if isinstance(stmt, (ast.Train, ast.Eval)):
            verb = "train" if isinstance(stmt, ast.Train) else "eval"
            model = self.model_ref(stmt.model, live=verb == "train")
            data = self.data_ref(stmt.data)
            opts = self.options(stmt.options, R.STATEMENTS[verb], stmt.span)
            fits = self.encoder_rules(verb, stmt, model, data, opts) if _is_encoder(model) else True
            fits = self.comparable(stmt, model, opts) and fits
            if model and data and model.args.get("seq") and isinstance(data.args.get("seq"), int):
                if data.args["seq"] > model.args["seq"]:
                    self.err("E0402", f"data '{data.name}' has seq={data.args['seq']} but model "
                             f"'{model.name}' takes at most seq={model.args['seq']}", stmt.data.span,
                             f"lower the data's seq, or raise the model's seq to {data.args['seq']}")
                elif model.arch and model.arch.positions == "learned":  # a soft prompt's positions come first
                    n = sum(u.args["length"] for u in model.adapters if u.technique == "prompt"
                            and (u.span.line, u.span.col) < (stmt.span.line, stmt.span.col))
                    rows = model.arch.positions_table
                    if n and data.args["seq"] + n > rows:
                        self.err("E0402", f"data '{data.name}' has seq={data.args['seq']} and the soft prompt adds "
                                 f"{n} positions, but model '{model.name}' has {rows} learned positions",
                                 stmt.data.span, f"lower the data's seq to {rows - n}, or shorten the prompt")
            if model and data and isinstance(model.args.get("vocab"), int) and data.source:
                dv = R.data_vocab(data.source, data.args)
                if isinstance(dv, int) and dv > model.args["vocab"]:
                    self.err("E0405", f"data '{data.name}' produces {dv} token ids but model '{model.name}' "
                             f"has vocab={model.args['vocab']}", stmt.data.span,
                             f"raise the model's vocab to at least {dv}"
                             + (" (byte-level text uses 256 ids)" if dv == R.BYTE_VOCAB else ""))
            if verb == "eval" and opts is not None:
                if "similarity" in (opts.get("metrics") or []) and opts.get("against") is None:
                    self.err("E0403", "metrics=[similarity] compares two models, but no against= is given",
                             stmt.span, "add against=MODEL or against=model@stage")
                    return None
            if verb == "train" and model and opts is not None and opts.get("distill_from") is not None:
                fits = self.teacher_fits(stmt, model, opts["distill_from"]) and fits
            elif verb == "train" and opts is not None and "temperature" in {o.name.name for o in stmt.options}:
                self.err("E0403", "temperature= sets the distillation temperature, and no distill_from= is given",
                         self.option_span(stmt, "temperature"), "add distill_from=TEACHER, or drop temperature=")
                fits = False
            if model and data and opts is not None and fits:
                return Step(verb, _ref(stmt.model), opts, stmt.span,
                            Ref("data", data.name, split=stmt.data.split.name if stmt.data.split else None),
                            given=frozenset(o.name.name for o in stmt.options))
        elif isinstance(stmt, ast.Export):
            model = self.model_ref(stmt.model, live=False)
            if not stmt.path.value.strip():
                self.err("E0305", "export path is empty", stmt.path.span, 'write a folder such as "out/model"')
                model = None
            opts = self.options(stmt.options, R.STATEMENTS["export"], stmt.span)
            if model and opts is not None and opts["format"] == "hf" and not opts["merge_adapters"]:
                until = self.snapshot_end(stmt.model.stage.name) if stmt.model.stage else stmt.span
                if any(until is None or (u.span.line, u.span.col) < (until.line, until.col) for u in model.adapters):
                    self.err("E0406", f"format=hf writes a plain transformers model, and '{stmt.model.model.name}' "
                             "has adapters", stmt.span, "add merge_adapters=true to fold them into the weights")
                    return None
            if model and opts is not None and (opts["merge_adapters"] or opts["format"] == "hf"):
                until = self.snapshot_end(stmt.model.stage.name) if stmt.model.stage else stmt.span
                stuck = [u for u in model.adapters if R.ADAPTERS.entries[u.technique].unmergeable
                         and (until is None or (u.span.line, u.span.col) < (until.line, until.col))]
                if stuck:
                    u = stuck[0]
                    self.err("E0409", f"the {u.technique} adapter of line {u.span.line} cannot be merged into the "
                             f"weights: {R.ADAPTERS.entries[u.technique].unmergeable}", stmt.span,
                             "export with format=effc (merge_adapters=false keeps adapters apart)"
                             + (" or format=peft" if u.technique == "prompt" else ""))
                    return None
            if model and opts is not None and (opts["merge_adapters"] or opts["format"] == "hf") and model.arch \
                    and model.arch.tied and any("head" in u.paths for u in model.adapters):
                a = model.arch
                self.diags.append(warning(
                    "W0102", "merging the adapter on the tied head unties it from the embedding", stmt.span,
                    f"the export stores the head as its own {a.vocab} x {a.dim} matrix "
                    f"(+{a.vocab * a.dim:,} parameters); the embedding keeps its weights"))
            if model and opts is not None and not self.compressed_export(stmt, model, opts):
                return None
            if model and opts is not None and opts["format"] == "peft":
                until = self.snapshot_end(stmt.model.stage.name) if stmt.model.stage else stmt.span
                uses = [u for u in model.adapters
                        if until is None or (u.span.line, u.span.col) < (until.line, until.col)]
                problem = _peft_export_problem(model, uses, opts)
                if problem:
                    self.err("E0407", problem[0], stmt.span, problem[1])
                    return None
            if model and opts is not None:
                return Step("export", _ref(stmt.model), opts, stmt.span, path=stmt.path.value)
        elif isinstance(stmt, ast.Tie):
            return self.tie(stmt)
        else:
            verb = {ast.Adapt: "adapt", ast.Share: "share", ast.Prune: "prune", ast.Quantize: "quantize"}[type(stmt)]
            return self.technique(stmt, verb)
        return None

    def teacher_fits(self, stmt: ast.Train, model: ModelInfo, ref: Ref) -> bool:
        """A teacher predicts over the student's vocabulary: both are language models with
        one vocab size (the teacher may be another model, or a snapshot of this one)."""
        teacher = self.models.get(ref.name)
        if teacher is None or teacher.arch is None or model.arch is None:
            return True
        if _is_encoder(model) or _is_encoder(teacher):
            self.err("E0410", "distillation matches next-token distributions, and "
                     f"'{model.name if _is_encoder(model) else teacher.name}' is a sentence encoder",
                     self.option_span(stmt, "distill_from"), "distill language models into language models")
            return False
        if teacher.arch.vocab != model.arch.vocab:
            self.err("E0410", f"teacher '{ref.name}' predicts over {teacher.arch.vocab} tokens and '{model.name}' "
                     f"over {model.arch.vocab}: their distributions cannot be compared",
                     self.option_span(stmt, "distill_from"), "distill from a model with the same tokenizer and vocab")
            return False
        return True

    def compressed_export(self, stmt: ast.Export, model: ModelInfo, opts: dict) -> bool:
        """What an export does with compressed storage: format=effc keeps packed, sparse and
        shared tensors as they are (it cannot fold an adapter into a packed weight);
        format=hf holds dense, unshared tensors, so it dequantizes and unrolls (W0103)."""
        until = self.snapshot_end(stmt.model.stage.name) if stmt.model.stage else stmt.span
        before = lambda u: until is None or (u.span.line, u.span.col) < (until.line, until.col)  # noqa: E731
        edits = [e for e in model.edits if before(e)]
        quantized = {p for e in edits if e.verb == "quantize" for p in e.paths}
        on_packed = [u for u in model.adapters if before(u) and u.paths & quantized]
        if opts["format"] == "effc" and opts["merge_adapters"] and on_packed:
            self.err("E0406", f"merge_adapters=true folds the adapter of line {on_packed[0].span.line} into its weight, "
                     "and that weight is quantized: format=effc keeps it packed", stmt.span,
                     "merge_adapters=false keeps the adapters apart over the packed weights; format=hf writes "
                     "dequantized weights with the adapters merged")
            return False
        shrunk = next((e for e in edits if e.technique in ("heads", "channels", "drop_sublayers")), None)
        if shrunk and opts["format"] in ("hf", "compressed_tensors", "peft"):
            what = {"heads": "some layers have fewer attention heads", "channels": "some MLPs are narrower",
                    "drop_sublayers": "some layers have lost a sublayer"}[shrunk.technique]
            self.err("E0406", f"format={opts['format']} describes every layer with one transformers config, and "
                     f"{what} (line {shrunk.span.line})", stmt.span,
                     "export with format=effc, which records the pruning with the weights")
            return False
        if opts["format"] == "compressed_tensors":
            schemes = {e.technique: e for e in edits if e.verb == "quantize"}
            problem = None
            if not {"int8", "int4"} & set(schemes):
                problem = ("format=compressed_tensors holds int8 and int4 quantized weights, and "
                           f"'{model.name}' has none at this point", "quantize before exporting, or use format=hf")
            elif "nf4" in schemes:
                problem = (f"the nf4 weights of line {schemes['nf4'].span.line} have no compressed-tensors format",
                           "quantize them with int4(...) for this format, or export with format=effc")
            elif on_packed:
                problem = (f"the adapter of line {on_packed[0].span.line} sits on a quantized weight, and "
                           "compressed-tensors holds the quantized weight alone",
                           "export the adapters apart with format=peft, or keep them with format=effc")
            elif any(before(u) for u in model.adapters) and not opts["merge_adapters"]:
                problem = (f"format=compressed_tensors writes a plain transformers model, and '{model.name}' has "
                           "adapters", "add merge_adapters=true to fold them into the dense weights")
            if problem:
                self.err("E0406", problem[0], stmt.span, problem[1])
                return False
        if opts["format"] == "hf" and any(e.verb in ("quantize", "share") for e in edits):
            what = [w for v, w in (("quantize", "dequantizes the quantized weights to fp32"),
                                   ("share", "writes every loop of a shared block as its own layer"))
                    if any(e.verb == v for e in edits)]
            self.diags.append(warning("W0103", f"format=hf holds dense, unshared weights: the export {' and '.join(what)}",
                                      stmt.span, "format=effc keeps the compressed storage, and "
                                      "format=compressed_tensors keeps int8 and int4 weights quantized"))
        return True

    def encoder_rules(self, verb: str, stmt: ast.Train | ast.Eval, model: ModelInfo, data: DataInfo | None,
                      opts: dict | None) -> bool:
        """A sentence encoder learns from, and is measured on, (anchor, positive) pairs with
        in-batch negatives: its data are jsonl prompt/response records tokenized by a real
        tokenizer, each micro-batch holds at least MIN_PAIRS pairs, and perplexity, which
        needs next-token predictions, is not defined for it. False after any error."""
        ok = True
        what = f"'{model.name}' is a sentence encoder ({model.args.get('architecture', model.family)})"
        problem = _pair_data_problem(data, self.written_path(model.name)) if data and data.source else None
        if problem:
            self.err("E0405", f"{what}, which learns from (anchor, positive) pairs, and data '{data.name}' "
                     f"{problem[0]}", stmt.data.span, problem[1])
            ok = False
        if opts is None:
            return False
        if verb == "eval":
            if "perplexity" in opts["metrics"]:
                self.err("E0410", f"perplexity is not defined for '{model.name}', a sentence encoder "
                         f"({model.args.get('architecture', model.family)}): it predicts no tokens",
                         self.metric_span(stmt, "perplexity"),
                         "metrics=[loss] measures its contrastive loss and top-1 retrieval on the pairs; "
                         "similarity compares its embeddings with another model's (against=)")
                ok = False
            if opts["samples"] is not None and opts["samples"] < R.MIN_PAIRS:
                self.err("E0306", f"samples={opts['samples']} is out of range for a sentence encoder: its loss "
                         f"compares each pair with the others, so it needs at least {R.MIN_PAIRS}",
                         self.option_span(stmt, "samples"), f"evaluate at least {R.MIN_PAIRS} pairs")
                ok = False
        elif opts["batch"] // opts["accumulate"] < R.MIN_PAIRS:
            batch, acc = opts["batch"], opts["accumulate"]
            split = f"batch={batch} in accumulate={acc} micro-batches" if acc > 1 else f"batch={batch}"
            self.err("E0309", f"{split} leaves a micro-batch with fewer than {R.MIN_PAIRS} pairs, and a pair's "
                     "negatives are the other positives of its micro-batch", self.option_span(stmt, "batch"),
                     f"raise batch to at least {R.MIN_PAIRS * acc}" + (" or lower accumulate" if acc > 1 else ""))
            ok = False
        return ok

    def comparable(self, stmt: ast.Train | ast.Eval, model: ModelInfo | None, opts: dict | None) -> bool:
        """against= compares two models of one kind: two sentence encoders of one width
        (their embeddings), or two language models (their predictions)."""
        against = opts.get("against") if isinstance(stmt, ast.Eval) and opts else None
        other = self.models.get(against.name) if isinstance(against, Ref) else None
        if model is None or other is None or model.arch is None or other.arch is None:
            return True
        kind = lambda m: "a sentence encoder" if _is_encoder(m) else "a language model"  # noqa: E731
        if kind(model) != kind(other):
            self.err("E0410", f"'{model.name}' is {kind(model)} and '{other.name}' is {kind(other)}: they cannot "
                     "be compared on the same data", self.option_span(stmt, "against"),
                     f"compare '{model.name}' with {kind(model)}, such as one of its snapshots "
                     f"({model.name}@stage)")
            return False
        if _is_encoder(model) and "similarity" in opts["metrics"] and model.arch.dim != other.arch.dim:
            self.err("E0410", f"similarity compares embeddings of one width, and '{model.name}' has {model.arch.dim} "
                     f"dimensions, '{other.name}' {other.arch.dim}", self.option_span(stmt, "against"),
                     "compare with a snapshot of the same model, or leave similarity out of metrics")
            return False
        return True

    def option_span(self, stmt, name: str) -> Span:
        """Where a statement's option `name` is written (its value), else the statement."""
        return next((o.value.span for o in stmt.options if o.name.name == name), stmt.span)

    def metric_span(self, stmt, metric: str) -> Span:
        """Where `metric` is written in metrics=[...], else the option or the statement."""
        listed = next((o.value for o in stmt.options if o.name.name == "metrics"), None)
        items = listed.items if isinstance(listed, ast.List) else ()
        return next((i.span for i in items if isinstance(i, ast.Name) and i.name == metric),
                    self.option_span(stmt, "metrics"))

    def written_path(self, model: str) -> str | None:
        """The checkpoint folder of `model m = hf("folder")` as the file writes it."""
        decl = next((i for i in self.program.items if isinstance(i, ast.ModelDecl) and i.name.name == model), None)
        args = decl.value.args if decl is not None and isinstance(decl.value, ast.Call) else ()
        first = next((a.value if isinstance(a, ast.KwArg) else a for a in args
                      if not isinstance(a, ast.KwArg) or a.name.name == "path"), None)
        return first.value if isinstance(first, ast.Str) else None

    def technique(self, stmt, verb: str) -> Step | None:
        selected = self.selector(stmt.target)
        checked = self.call(stmt.technique, R.TECHNIQUES[verb])
        if selected is None or checked is None:
            return None
        entry = R.TECHNIQUES[verb].entries[checked.name]
        targets = self.targets(selected, entry, stmt.target)
        if not targets:
            return None
        problems = entry.target_constraints(checked.args, targets) if entry.target_constraints else []
        for p in problems:
            self.err("E0309", p.message, self.arg_span(stmt.technique, p.arg), p.hint)
        if problems:
            return None
        if verb == "adapt":
            self.adapter(stmt, checked, targets)
            return None
        return self.edit(stmt, verb, checked, targets)

    def tie(self, stmt: ast.Tie) -> Step | None:
        """`tie A with B`: every param of each selected module of A reads the param at the
        same place in the matching module of B (pairs in selection order), which must
        have the same structure and shapes."""
        a, b = self.selector(stmt.target), self.selector(stmt.source)
        if a is None or b is None:
            return None
        if stmt.target.model.name != stmt.source.model.name:
            self.err("E0309", "tie shares weights within one model, and the two selections name different models",
                     stmt.source.span, f"select both in '{stmt.target.model.name}'")
            return None
        if len(a) != len(b):
            self.err("E0309", f"the first selection holds {len(a)} modules and the second {len(b)}: tie pairs them "
                     "in order", stmt.source.span, "select as many modules on each side")
            return None
        for x, y in zip(a, b):
            if x.path == y.path or x.path.startswith(y.path + ".") or y.path.startswith(x.path + "."):
                self.err("E0309", f"'{x.path}' and '{y.path}' overlap: a module cannot share its weights with itself",
                         stmt.source.span, "tie two separate modules, such as layers[3] with layers[1]")
                return None
            if _shape(x.module) != _shape(y.module):
                head = {x.module.kind, y.module.kind} == {"linear", "embedding"}
                self.err("E0309", f"'{x.path}' and '{y.path}' are not congruent: their modules or weight shapes "
                         "differ", stmt.source.span,
                         "a head reads the embedding's matrix when the model is declared with tied=true" if head
                         else "tie modules of one kind and size")
                return None
        model = self.models[stmt.target.model.name]
        use = EditUse("tie", "tie", tuple(x.path for x in a), stmt.span, {"source": [y.path for y in b]})
        problem = edit_problem(model, use)
        if problem:
            self.err("E0210", problem[0], stmt.target.span, problem[1])
            return None
        model.edits.append(use)
        return Step("tie", Ref("model", model.name), use.args, stmt.span, edit=use)

    def edit(self, stmt, verb: str, checked: CallValue, targets: list[Selected]) -> Step | None:
        """A one-shot change (share, prune, quantize): its order against the model's other
        edits and adapters (lang.compress), then the Step the runtime executes."""
        model = self.models.get(stmt.target.model.name)
        if model is None:
            return None
        if not self.calibration_fits(stmt, model, checked.args):
            return None
        use = EditUse(verb, checked.name, tuple(t.path for t in targets), stmt.span, checked.args)
        problem = edit_problem(model, use)
        if problem:
            code, span = ("E0210", stmt.target.span) if len(problem) == 2 else \
                (problem[2], self.arg_span(stmt.technique, problem[3]))
            self.err(code, problem[0], span, problem[1])
            return None
        model.edits.append(use)
        return Step(verb, Ref("model", model.name), checked.args, stmt.span, edit=use)

    def calibration_fits(self, stmt, model: ModelInfo, args: dict) -> bool:
        """calibrate=DATA feeds the model: its token ids must fit the vocabulary (E0405)."""
        ref = args.get("calibrate")
        data = self.data.get(ref.name) if isinstance(ref, Ref) else None
        if model and data and isinstance(model.args.get("vocab"), int) and data.source:
            dv = R.data_vocab(data.source, data.args)
            if isinstance(dv, int) and dv > model.args["vocab"]:
                self.err("E0405", f"calibration data '{data.name}' produces {dv} token ids but model "
                         f"'{model.name}' has vocab={model.args['vocab']}", self.arg_span(stmt.technique, "calibrate"),
                         "calibrate on data tokenized for this model"
                         + (" (byte-level text uses 256 ids)" if dv == R.BYTE_VOCAB else ""))
                return False
        return True

    def targets(self, selected: list[Selected], entry: Entry, sel: ast.Selector) -> list[Selected]:
        """The modules a technique acts on: selected modules of its kinds, and the modules
        of its kinds inside any selected container."""
        out, seen = [], set()
        for s in selected:
            for t in (walk(s) if s.module.kind not in entry.targets else [s]):
                if t.module.kind in entry.targets and t.path not in seen:
                    seen.add(t.path)
                    out.append(t)
        if not out and entry.targets == ("model",):
            self.err("E0206", f"{entry.name} adapts a whole model, and '{_sel_text(sel)}' is part of one", sel.span,
                     f"select the model by its name: adapt {sel.model.name} with {entry.name}(...)")
        elif not out:
            kinds = " or ".join(entry.targets)
            example = {"linear": "layers[*].attn.{q,v}", "embedding": "embed"}.get(entry.targets[0], "layers[*].{attn,mlp}")
            self.err("E0206", f"{entry.name} applies to {kinds} modules, and '{_sel_text(sel)}' holds none",
                     sel.span, f"select {kinds} modules, for example {sel.model.name}.{example}")
        return out

    def adapter(self, stmt: ast.Adapt, checked: CallValue, targets: list[Selected]) -> None:
        model = self.models.get(stmt.target.model.name)
        if checked.name == "peft":
            return self.peft_adapter(stmt, model, checked.args["path"], targets)
        if not self.calibration_fits(stmt, model, checked.args):
            return
        if checked.args.get("init") == "pissa" and model.arch and model.arch.tied and any(t.path == "head" for t in targets):
            self.err("E0309", "init=pissa rewrites the weight it adapts into its residual, and the tied head shares "
                     "its weight with the embedding", self.arg_span(stmt.technique, "init"),
                     "adapt the head with another init, or leave it out of the selection")
            return
        scope = "per_loop" if checked.args.get("per_loop") else "shared"
        paths = frozenset(t.path for t in targets)
        problem = adapter_problem(model, checked.name, scope, paths, checked.args)
        if problem:
            self.err("E0210", problem[0], stmt.target.span, problem[1])
            return
        self.add_adapter(stmt, model, checked.name, scope, frozenset(t.path for t in targets), checked.args)

    def add_adapter(self, stmt: ast.Adapt, model: ModelInfo, technique: str, scope: str, paths: frozenset[str],
                    args: dict) -> bool:
        exclusive = R.ADAPTERS.entries[technique].exclusive
        for prior in model.adapters:
            shared = _adapted_weights(technique, paths) & _adapted_weights(prior.technique, prior.paths)
            if shared and (exclusive or R.ADAPTERS.entries[prior.technique].exclusive) \
                    and (prior.technique, prior.scope) != (technique, scope):
                first = sorted(shared)[0]
                alone = technique if exclusive else prior.technique
                self.err("E0209", f"'{first}' already has a {prior.technique} adapter, and {alone} must be the "
                         "only adapter on its weight", stmt.target.span,
                         f"the first is at line {prior.span.line}; {alone} {ALONE_WHY.get(alone, 'rescales the weight')}, so it does not "
                         "compose with other adapters: adapt different weights, or use one adapter here")
                return False
            overlap = paths & prior.paths if (prior.technique, prior.scope) == (technique, scope) else ()
            if overlap:
                first = sorted(overlap)[0]
                self.err("E0207", f"'{first}' already has a {scope} {technique} adapter", stmt.target.span,
                         f"the first is at line {prior.span.line}; two adapters of one kind and scope on a "
                         "weight are ambiguous (a per-loop adapter may sit beside a shared one)")
                return False
        model.adapters.append(AdapterUse(technique, scope, paths, stmt.span, args))
        return True

    def peft_adapter(self, stmt: ast.Adapt, model: ModelInfo, folder: str, targets: list[Selected]) -> None:
        """`adapt m with peft("dir")`: the adapters adapter_config.json describes (lang.peft)."""
        family = hf_family(model)
        span = self.arg_span(stmt.technique, "path") if stmt.technique.keywords else stmt.technique.args[0].span
        if family is None:
            self.err("E0408", f"peft(...) adapters load onto Hugging Face models, and '{model.name}' is a "
                     f"{model.family} model", stmt.target.span, "declare the model with hf(\"dir\") or decoder(...)")
            return
        linears = [t.path for s in targets for t in walk(s) if t.module.kind == "linear"]
        try:
            uses = peft_uses(folder, family, linears, model.arch.dim if model.arch else None)
        except PeftConfigError as e:
            self.err("E0408", e.message, span, e.hint)
            return
        for u in uses:
            if not self.add_adapter(stmt, model, u.technique, "shared", u.paths, u.args):
                return

    def snapshot_end(self, stage: str) -> Span | None:
        """Where `M@stage` is taken: the start of the stage after it (None: after the last)."""
        names = list(self.stages)
        i = names.index(stage)
        return self.stages[names[i + 1]].span if i + 1 < len(names) else None

    # ------------------------------------------------------------ references

    def undefined(self, name: str, span: Span) -> None:
        if name in self.later:
            self.used.add(name)  # it is used, just too early; "never used" would contradict this
            kind, decl = self.later[name]
            self.err("E0101", f"{kind} '{name}' is used before its declaration", span,
                     f"it is declared at line {decl.line}; move that declaration up")
        elif name.lower() in ("true", "false"):
            self.err("E0101", f"undefined name '{name}'", span, f"did you mean '{name.lower()}'? booleans are lowercase")
        else:
            self.err("E0101", f"undefined name '{name}'",
                     span, _did_you_mean(name, self.declared, "declared names"))

    def lookup(self, ident: ast.Ident, kind: str) -> bool:
        """True when `ident` names a declaration of `kind` made before this point."""
        found = self.declared.get(ident.name)
        if found is None:
            self.undefined(ident.name, ident.span)
            return False
        self.used.add(ident.name)
        if found[0] != kind:
            self.err("E0107", f"'{ident.name}' is a {found[0]}, not a {kind}", ident.span,
                     _did_you_mean(ident.name, [n for n, (k, _) in self.declared.items() if k == kind],
                                   f"{_plural(kind)} declared so far"))
            return False
        return True

    def model_ref(self, ref: ast.ModelRef, live: bool) -> ModelInfo | None:
        if ref.stage is not None:
            if live:
                self.err("E0110", f"'{ref.model.name}@{ref.stage.name}' is a snapshot; this statement "
                         "acts on the live model", ref.span, f"name the model: {ref.model.name}")
                return None
            return self.models.get(ref.model.name) if self.snapshot(ref.model, ref.stage) else None
        return self.models[ref.model.name] if self.lookup(ref.model, "model") else None

    def data_ref(self, ref: ast.DataRef) -> DataInfo | None:
        if not self.lookup(ref.data, "data"):
            return None
        if ref.split is not None and ref.split.name not in R.DATA_SPLITS:
            self.err("E0108", f"data has no split '{ref.split.name}'", ref.split.span,
                     _did_you_mean(ref.split.name, R.DATA_SPLITS, "splits"))
            return None
        return self.data[ref.data.name]

    def snapshot(self, model: ast.Ident, stage: ast.Ident) -> bool:
        name, sname = model.name, stage.name
        if sname not in self.stages:
            self.err("E0105", f"no stage named '{sname}'", stage.span,
                     _did_you_mean(sname, self.stages, "stages"))
            return False
        if sname not in self.done:
            self.err("E0106", f"stage '{sname}' has not finished at this point", stage.span,
                     f"a snapshot names an earlier stage; '{sname}' is at line {self.stages[sname].span.line}")
            return False
        if not self.lookup(model, "model"):
            return False
        if name not in self.done[sname]:
            self.err("E0109", f"model '{name}' did not exist when stage '{sname}' ended", model.span,
                     "declare the model before that stage")
            return False
        return True

    # ------------------------------------------------------------ selectors

    def selector(self, sel: ast.Selector) -> list[Selected] | None:
        found = self.declared.get(sel.model.name)
        if found is None or found[0] != "model":
            if found is None:
                self.undefined(sel.model.name, sel.model.span)
            else:
                self.err("E0201", f"a selector starts with a model; '{sel.model.name}' is a {found[0]}",
                         sel.model.span, _did_you_mean(sel.model.name, self.models, "models"))
            return None
        self.used.add(sel.model.name)
        tree = self.models[sel.model.name].tree
        if tree is None:
            return None  # the model's own declaration is wrong; that error is reported
        current = [Selected("", tree)]
        for seg in sel.path:
            current = self.segment(current, seg, sel)
            if current is None:
                return None
        if sel.kind is not None:
            kind = sel.kind.name
            if kind not in KINDS:
                self.err("E0204", f"unknown kind filter ':{kind}'", sel.kind.span,
                         _did_you_mean(kind, KINDS, "kinds"))
                return None
            kept = [t for s in current for t in [s] if t.module.kind == kind]
            if not kept:
                present = sorted({s.module.kind for s in current})
                self.err("E0208", f"no selected module is a {kind}", sel.kind.span,
                         f"the selection holds: {', '.join(present)}; add '.**' to reach the modules inside")
                return None
            current = kept
        return current

    def segment(self, current: list[Selected], seg, sel: ast.Selector) -> list[Selected] | None:
        if isinstance(seg, ast.AnyDepth):
            out, seen = [], set()
            for s in current:
                for t in walk(s):
                    if t.path not in seen:
                        seen.add(t.path)
                        out.append(t)
            return out
        names = [seg.name] if isinstance(seg, ast.Field) else list(seg.names)
        out = []
        for ident in names:
            hits = [Selected(join(s.path, ident.name), s.module.child(ident.name))
                    for s in current if s.module.child(ident.name) is not None]
            if not hits:
                self.no_match(current, ident, sel)
                return None
            out += hits
        if isinstance(seg, ast.Field) and seg.index is not None:
            return self.index(out, seg, sel)
        return out

    def no_match(self, current: list[Selected], ident: ast.Ident, sel: ast.Selector) -> None:
        where = current[0]
        names = sorted({n for s in current for n in s.module.child_names()})
        at = _generic(where.path) or sel.model.name
        if where.module.is_list:
            hint = f"'{at}' is a list of {len(where.module.items)}; index it first: {at}[*].{ident.name}"
        elif names:
            near = _nearest(ident.name, names)
            hint = (f"did you mean '{near[0]}'? " if near else "") + f"({at} has: {', '.join(names)})"
        else:
            hint = f"'{at}' is a {where.module.kind} and has no members"
        self.err("E0203", f"selector matches nothing: '{ident.name}'", ident.span, hint)

    def index(self, hits: list[Selected], seg: ast.Field, sel: ast.Selector) -> list[Selected] | None:
        out = []
        for s in hits:
            m = s.module
            if not m.is_list:
                self.err("E0205", f"'{seg.name.name}' is {_article(m.kind)}, not a list; it cannot be indexed",
                         seg.index.span, f"write {seg.name.name} without [...]")
                return None
            n, ix = len(m.items), seg.index
            if isinstance(ix, ast.IndexAll):
                picks = range(n)
            elif isinstance(ix, ast.IndexAt):
                if not -n <= ix.index < n:
                    self.err("E0202", f"index {ix.index} is out of range: '{seg.name.name}' has {n} items",
                             ix.span, f"valid indices are 0..{n - 1} (or -{n}..-1 from the end)")
                    return None
                picks = [ix.index % n]
            else:
                bad = [v for v in (ix.start, ix.stop) if v is not None and not -n <= v <= n]
                picks = range(n)[ix.start:ix.stop]
                if bad or not picks:
                    self.err("E0202", f"slice [{_slice_text(ix)}] of '{seg.name.name}' " +
                             ("is out of range" if bad else "is empty") + f": it has {n} items",
                             ix.span, f"slices run from 0 to {n}, as in {seg.name.name}[0:{n}]")
                    return None
            out += [Selected(f"{s.path}[{i}]", m.items[i]) for i in picks]
        return out

    # ------------------------------------------------------------ calls and options

    def call(self, call: ast.Call, reg: Registry, also: Registry | None = None) -> CallValue | None:
        name = call.func.name
        entry = reg.entries.get(name)
        if entry is None:
            if name in reg.planned:
                self.err("E0302", f"{reg.kind} '{name}' is not available in this version", call.func.span,
                         f"it comes with {reg.planned[name]}; available now: {', '.join(reg.names()) or 'none'}")
            else:
                regs = [reg] + ([also] if also else [])
                known = [n for r in regs for n in list(r.entries) + list(r.planned)]
                what = " and ".join(_plural(r.kind) for r in regs)
                self.err("E0301", f"unknown {reg.kind} '{name}'", call.func.span, _did_you_mean(name, known, what))
            return None
        args = self.bind(call.args, entry, call.func.span, "E0303", "E0304", f"{name}(...)")
        return None if args is None else CallValue(name, args)

    def options(self, opts: tuple[ast.KwArg, ...], entry: Entry, span: Span) -> dict | None:
        return self.bind(opts, entry, span, "E0310", "E0311", f"'{entry.name}'")

    def bind(self, args, entry: Entry, span: Span, unknown: str, missing: str, owner: str) -> dict | None:
        """Bind written arguments to the entry's parameters, type-check each, apply
        cross-argument constraints. Returns the arguments with defaults filled in."""
        ok, given, spans, seen_kw = True, {}, {}, False
        meant: set[str] = set()  # parameters a misspelt argument probably meant
        positional = [p for p in entry.params]
        for i, a in enumerate(args):
            if isinstance(a, ast.KwArg):
                seen_kw, pname, expr, aspan = True, a.name.name, a.value, a.name.span
            elif seen_kw:
                self.err("E0308", "positional argument after a keyword argument", a.span,
                         "give it by name, or move it before the keyword arguments")
                ok, meant = False, meant | {p.name for p in entry.params}
                continue
            elif i >= len(positional):
                self.err("E0308", f"{owner} takes at most {len(positional)} positional arguments", a.span,
                         "give the arguments by name")
                ok = False
                continue
            else:
                pname, expr, aspan = positional[i].name, a, a.span
            p = entry.param(pname)
            if p is None:
                what = "option" if unknown == "E0310" else "argument"
                names = [q.name for q in entry.params]
                self.err(unknown, f"{owner} has no {what} '{pname}'", aspan, _did_you_mean(pname, names, f"{what}s"))
                meant.update(_nearest(pname, names))
                ok = False
                continue
            if pname in given:
                self.err("E0308", f"'{pname}' is given twice", aspan, "give each argument once")
                ok = False
                continue
            if not p.available:
                self.err("E0302", f"{owner.strip(chr(39))} option '{pname}' is not available in this version",
                         aspan, "it is part of the settled language and comes with a later issue")
                ok = False
                continue
            value = self.coerce(self.value(expr), p.type, expr.span, expr)
            ok = ok and value is not BAD
            given[pname], spans[pname] = value, expr.span
        for p in entry.params:
            if p.required and p.name not in given and p.name not in meant:
                what = "option" if missing == "E0311" else "argument"
                self.err(missing, f"{owner} needs the {what} '{p.name}'", span,
                         f"add {p.name}=... ({p.type.describe()}: {p.doc})")
                ok = False
        if not ok:
            return None
        full = {p.name: given.get(p.name, p.default) for p in entry.params}
        for p in entry.params:  # defaults that name another parameter (kv_heads=heads, alpha=rank)
            if full[p.name] is None and p.default_doc in full and full[p.default_doc] is not None:
                v = full[p.default_doc]
                full[p.name] = float(v) if isinstance(p.type, FloatT) else v
            elif full[p.name] is None and isinstance(p.type, CallT) and p.default_doc:
                default = R.CALLABLES[p.type.registry].entries[p.default_doc.removesuffix("()")]
                full[p.name] = CallValue(default.name, {q.name: q.default for q in default.params})
        for prob in (entry.constraints(full) if entry.constraints else []):
            self.err("E0309", prob.message, spans.get(prob.arg, span), prob.hint)
            ok = False
        return full if ok else None

    def arg_span(self, call: ast.Call, name: str) -> Span:
        return next((a.value.span for a in call.keywords if a.name.name == name), call.span)

    # ------------------------------------------------------------ values

    def value(self, e: ast.Expr) -> Any:
        if isinstance(e, (ast.Int, ast.Float, ast.Str, ast.Bool)):
            return e.value
        if isinstance(e, ast.Size):
            return Bytes(e.value)
        if isinstance(e, ast.Name):
            found = self.declared.get(e.name)
            if found is None:
                return Bare(e.name, e.span)
            self.used.add(e.name)
            return self.params[e.name] if found[0] == "param" else Ref(found[0], e.name)
        if isinstance(e, ast.Attr):
            ref = ast.DataRef(e.base, e.attr, e.span)
            return Ref("data", e.base.name, split=e.attr.name) if self.data_ref(ref) else BAD
        if isinstance(e, ast.Snapshot):
            return Ref("model", e.model.name, stage=e.stage.name) if self.snapshot(e.model, e.stage) else BAD
        if isinstance(e, ast.Call):
            return e
        if isinstance(e, ast.List):
            return [self.value(x) for x in e.items]
        if isinstance(e, ast.Neg):
            return self.arith("-", 0, self.value(e.operand), e)
        return self.arith(e.op, self.value(e.left), self.value(e.right), e)

    def arith(self, op: str, a: Any, b: Any, e: ast.Expr) -> Any:
        result = self._arith(op, a, b, e)
        n = result.n if isinstance(result, Bytes) else result
        if isinstance(n, (int, float)) and not isinstance(n, bool) and not abs(n) < 10.0 ** MAX_DIGITS:
            self.err("E0312", "the result of this arithmetic is too large or not a number", e.span,
                     f"values are limited to {MAX_DIGITS} digits")
            return BAD
        return result

    def _arith(self, op: str, a: Any, b: Any, e: ast.Expr) -> Any:
        for v in (a, b):
            if isinstance(v, Bare):
                self.undefined(v.name, v.span)
                return BAD
            if v is BAD:
                return BAD
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if isinstance(a, Bytes) or isinstance(b, Bytes):
            # sizes add to sizes and scale by numbers
            if op in "+-" and isinstance(a, Bytes) and isinstance(b, Bytes):
                return Bytes(a.n + b.n if op == "+" else a.n - b.n)
            if op in "*/" and (num(a) or num(b)):
                x, y = (a.n if isinstance(a, Bytes) else a), (b.n if isinstance(b, Bytes) else b)
                if op == "/" and (isinstance(b, Bytes) or y == 0):
                    self.err("E0312", "a size divides only by a non-zero number", e.span)
                    return BAD
                q = x * y if op == "*" else x / y
                return Bytes(int(q)) if math.isfinite(q) and abs(q) < 10.0 ** MAX_DIGITS else q
        elif num(a) and num(b):
            if op == "/":
                if b == 0:
                    self.err("E0312", "division by zero", e.span)
                    return BAD
                exact = isinstance(a, int) and isinstance(b, int) and a % b == 0
                return a // b if exact else a / b
            return a + b if op == "+" else a - b if op == "-" else a * b
        self.err("E0312", f"cannot apply '{op}' to {_describe(a)} and {_describe(b)}", e.span,
                 "arithmetic works on numbers, params holding numbers, and sizes")
        return BAD

    def coerce(self, v: Any, t: Any, span: Span, expr: ast.Expr | None = None) -> Any:
        """Check a value against a parameter type; return the typed value or BAD. `expr`,
        when given, places errors about list items on the item itself."""
        if v is BAD:
            return BAD
        if isinstance(v, list) and any(x is BAD for x in v):
            return BAD
        if isinstance(v, Bare) and not isinstance(t, (EnumT, CallT, ListT)):
            self.undefined(v.name, v.span)
            return BAD
        if isinstance(t, IntT):
            if isinstance(v, int) and not isinstance(v, bool):
                return self.in_range(v, t.min, t.max, False, False, span)
            if isinstance(v, float) and v.is_integer():
                return self.in_range(int(v), t.min, t.max, False, False, span)
        elif isinstance(t, FloatT):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return self.in_range(float(v), t.min, t.max, t.min_open, t.max_open, span)
        elif isinstance(t, SizeT):
            if isinstance(v, Bytes):
                return v if self.in_range(v.n, t.min, None, False, False, span) is not BAD else BAD
        elif isinstance(t, (StrT, PathT, TokenizerT)):
            if isinstance(v, str):
                if isinstance(t, TokenizerT):
                    return v if v == "bytes" else self.path(v, span)
                return self.path(v, span) if isinstance(t, PathT) and t.must_exist else v
        elif isinstance(t, BoolT):
            if isinstance(v, bool):
                return v
        elif isinstance(t, EnumT):
            return self.choice(v, t, span)
        elif isinstance(t, ListT):
            if isinstance(v, list):
                if t.length is not None and len(v) != t.length:
                    self.err("E0314", f"expected a list of {t.length} items, found {len(v)}", span)
                    return BAD
                spans = [x.span for x in expr.items] if isinstance(expr, ast.List) else [span] * len(v)
                items = [self.coerce(x, t.item, s) for x, s in zip(v, spans)]
                return BAD if any(x is BAD for x in items) else items
        elif isinstance(t, CallT):
            return self.call_value(v, t, span)
        elif isinstance(t, ModelT):
            if isinstance(v, Ref) and v.kind == "model":
                return v
        elif isinstance(t, DataT):
            if isinstance(v, Ref) and v.kind == "data":
                return v
        self.err("E0305", f"expected {_article(t.describe())}, found {_describe(v)}", span,
                 _type_hint(v, t))
        return BAD

    def in_range(self, v, lo, hi, lo_open, hi_open, span: Span):
        below = lo is not None and (v <= lo if lo_open else v < lo)
        above = hi is not None and (v >= hi if hi_open else v > hi)
        if below or above:
            self.err("E0306", f"{v} is out of range: expected a value{_range(lo, hi, lo_open, hi_open)}", span)
            return BAD
        return v

    def choice(self, v: Any, t: EnumT, span: Span) -> Any:
        if isinstance(v, Bare) and v.name in t.choices:
            if v.name in t.unavailable:
                self.err("E0302", f"'{v.name}' is not available in this version", span,
                         f"available now: {', '.join(c for c in t.choices if c not in t.unavailable)}")
                return BAD
            return v.name
        name = v.name if isinstance(v, (Bare, Ref)) else v if isinstance(v, str) else None
        if isinstance(v, str):
            hint = f"write the choice as a bare name, without quotes: {v}" if v in t.choices else None
        else:
            hint = None
        self.err("E0307", f"{_describe(v)} is not a choice here", span,
                 hint or _did_you_mean(name or "", t.choices, "choices"))
        return BAD

    def call_value(self, v: Any, t: CallT, span: Span) -> Any:
        reg = R.CALLABLES[t.registry]
        if isinstance(v, ast.Call):
            return self.call(v, reg) or BAD
        if isinstance(v, Bare) and t.bare_ok:
            entry = reg.entries.get(v.name)
            if entry is not None and not any(p.required for p in entry.params):
                return CallValue(v.name, {p.name: p.default for p in entry.params})
            if entry is None:
                self.err("E0301", f"unknown {reg.kind} '{v.name}'", span,
                         _did_you_mean(v.name, reg.names(), f"{reg.kind}s"))
                return BAD
        name = getattr(v, "name", "")
        hint = (f"write it as a call: {name}()" if name in reg.entries
                else _did_you_mean(name, reg.names(), _plural(reg.kind)))
        self.err("E0305", f"expected {_article(reg.kind)} call such as {reg.names()[0]}(...), found {_describe(v)}",
                 span, hint)
        return BAD

    def path(self, value: str, span: Span) -> Any:
        full = os.path.normpath(os.path.join(self.base_dir, value))
        if not os.path.exists(full):
            self.err("E0401", f"file not found: '{value}'", span,
                     f"paths are relative to the .eff file's folder; looked for {full}")
            return BAD
        return full


def _adapted_weights(technique: str, paths: frozenset[str]) -> frozenset[str]:
    """The weights an adapter use changes: a sublayer adapter (bottleneck) changes its
    sublayer's output projection (attn.o, mlp.down)."""
    if set(R.ADAPTERS.entries[technique].targets) <= {"attention", "mlp"}:
        return frozenset(f"{p}.{'o' if p.rsplit('.', 1)[-1] == 'attn' else 'down'}" for p in paths)
    return paths


def hf_family(model: ModelInfo) -> str | None:
    """The Hugging Face family of a model's parameter names: an hf(...) model's, and the
    built-in decoder's, which exports as Llama; None for any other family."""
    if model.family == "hf":
        return model.args.get("hf_family")
    return "llama" if model.family == "decoder" else None


PEFT_KINDS = ("lora", "dora", "ia3", "prompt")
# Why an exclusive adapter kind is alone on what it adapts (E0209's hint); others rescale it.
ALONE_WHY = {"paca": "trains columns of the weight in place", "prompt": "prepends the prompt to the sequence"}  # effc's kinds that PEFT's format holds


def _peft_export_problem(model: ModelInfo, uses: list[AdapterUse], opts: dict) -> tuple[str, str] | None:
    """Why format=peft cannot hold the model's adapters exactly, or None."""
    name = model.name
    family = hf_family(model)
    if family is None:
        return (f"format=peft writes adapters for a Hugging Face model, and '{name}' is a {model.family} model",
                "declare the model with hf(\"dir\") or decoder(...)")
    if opts["merge_adapters"]:
        return ("format=peft writes the adapters apart from the base model, so merge_adapters=true contradicts it",
                "drop merge_adapters=true, or export with format=hf to merge them")
    if not uses:
        return f"'{name}' has no adapters at this point: format=peft would write nothing", \
            "adapt the model first, or export with format=hf"
    kinds = sorted({u.technique for u in uses})
    foreign = [k for k in kinds if k not in PEFT_KINDS]
    if foreign:
        return (f"PEFT has no {foreign[0]} adapter (format=peft holds {', '.join(PEFT_KINDS)})",
                "export with format=effc, which keeps every kind"
                + ("" if R.ADAPTERS.entries[foreign[0]].unmergeable else ", or format=hf, which merges them into the weights"))
    if len(kinds) > 1:
        return (f"'{name}' has {' and '.join(kinds)} adapters, and a PEFT adapter holds one kind",
                "export the model with one kind of adapter (format=effc keeps them all)")
    seen: dict[str, AdapterUse] = {}
    for u in uses:
        for p in sorted(u.paths):
            if p in seen:
                return (f"'{p}' has two {u.technique} adapters, and a PEFT adapter holds one per module",
                        f"the first is at line {seen[p].span.line}; format=effc keeps both")
            seen[p] = u
            if u.technique != "prompt" and module_name(family, p) is None:
                return (f"'{p}' is one third of GPT-2's fused attention projection (c_attn), which PEFT "
                        "adapts only as a whole", "adapt attn.o, mlp.up or mlp.down, or export with format=effc")
    if len({bool(u.args.get("rslora")) for u in uses}) > 1:
        return ("some adapters set rslora=true and others not, and a PEFT adapter has one use_rslora",
                "give every adapt statement the same rslora")
    dropouts = sorted({u.args.get("dropout", 0.0) for u in uses})
    if len(dropouts) > 1:
        return (f"the adapters use dropout {' and '.join(map(str, dropouts))}, and a PEFT adapter has one lora_dropout",
                "give every adapt statement the same dropout")
    return None


def _ref(ref: ast.ModelRef) -> Ref:
    return Ref("model", ref.model.name, stage=ref.stage.name if ref.stage else None)


def _is_encoder(model: ModelInfo | None) -> bool:
    """A sentence encoder (BERT): its output is an embedding, not next-token predictions."""
    return bool(model and model.arch and model.arch.output == "embedding")


def _pair_data_problem(data: DataInfo, checkpoint: str | None) -> tuple[str, str] | None:
    """Why a data declaration cannot be a sentence encoder's pairs (the end of a message
    and a hint), or None for jsonl prompt/response records with a real tokenizer."""
    tok = f'tokenizer="{checkpoint}"' if checkpoint else 'tokenizer="<the checkpoint folder>"'
    declare = (f'declare pairs: jsonl("pairs.jsonl", seq={data.args.get("seq", 64)}, prompt="query", '
               f'response="positive", {tok}), each record holding an anchor and its positive')
    a = data.args
    if data.source == "jsonl" and a.get("prompt") is not None:
        if a.get("tokenizer", "bytes") == "bytes":
            return ("is tokenized as bytes", f"add {tok}: the encoder reads its checkpoint's tokens, with the "
                                             "[CLS] and [SEP] its tokenizer adds")
        return None
    kind = {"markov": "is a synthetic token stream", "jsonl": "holds chat records" if a.get("messages")
            else "is plain text"}.get(data.source, "is plain text")
    return kind, declare


def _shape(m: Module) -> tuple:
    """A module's structure: kinds, member names and weight shapes, recursively."""
    return (m.kind, m.shape, tuple((n, _shape(c)) for n, c in m.children), tuple(_shape(i) for i in m.items))


def _plural(kind: str) -> str:
    return kind if kind.endswith("data") else kind[:-1] + "ies" if kind.endswith("y") else kind + "s"


def _article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def _type_hint(v: Any, t: Any) -> str | None:
    if isinstance(t, SizeT) and isinstance(v, (int, float)):
        return f"write a size with a unit, such as {v}GiB or {v}MiB"
    if isinstance(t, (IntT, FloatT)) and isinstance(v, str):
        return "write the number without quotes"
    if isinstance(t, ListT) and not isinstance(v, list):
        return f"write a list: [{v.name if isinstance(v, (Bare, Ref)) else '...'}]"
    if isinstance(t, ModelT) and isinstance(v, Bare):
        return "name a declared model, or a snapshot model@stage"
    return None


def _generic(path: str) -> str:
    """'layers[3].attn' -> 'layers[*].attn', for hints about a whole selection."""
    return re.sub(r"\[\d+\]", "[*]", path)


def _slice_text(ix: ast.IndexSlice) -> str:
    return f"{'' if ix.start is None else ix.start}:{'' if ix.stop is None else ix.stop}"


def _sel_text(sel: ast.Selector) -> str:
    parts = [sel.model.name]
    for seg in sel.path:
        if isinstance(seg, ast.AnyDepth):
            parts.append("**")
        elif isinstance(seg, ast.NameSet):
            parts.append("{" + ",".join(n.name for n in seg.names) + "}")
        else:
            ix = seg.index
            suffix = "" if ix is None else "[*]" if isinstance(ix, ast.IndexAll) else \
                f"[{ix.index}]" if isinstance(ix, ast.IndexAt) else f"[{_slice_text(ix)}]"
            parts.append(seg.name.name + suffix)
    return ".".join(parts) + (f":{sel.kind.name}" if sel.kind else "")


# ---------------------------------------------------------------- entry points


def _overrides(overrides: dict[str, str] | None, program: ast.Program) -> tuple[dict, list[Diagnostic]]:
    out, diags = {}, []
    declared = {i.name.name for i in program.items if isinstance(i, ast.Param)}
    where = Span("<command line>", 1, 1, 1, 2)
    for name, text in (overrides or {}).items():
        if name not in declared:
            diags.append(error("E0111", f"--set {name}: the file has no param '{name}'", where,
                               _did_you_mean(name, declared, "params")))
            continue
        parsed = parse(f"param {name} = {text}\n", "<command line>")
        if parsed.program is None or len(parsed.program.items) != 1:
            diags.append(error("E0111", f"--set {name}={text}: the value does not parse", where,
                               "give a number, size, string in quotes, true/false or a list"))
            continue
        out[name] = parsed.program.items[0].value
    return out, diags


def check(program: ast.Program, source: str = "", catalog: ModelCatalog | None = None,
          overrides: dict[str, str] | None = None) -> CheckResult:
    """Check a parsed program. Paths resolve relative to the program's file."""
    over, diags = _overrides(overrides, program)
    base = os.path.dirname(os.path.abspath(program.path)) if program.path != "<input>" else os.getcwd()
    c = _Checker(program, catalog or default_catalog(), base, over)
    try:
        c.run()
    except Exception as exc:  # a checker bug must reach the user as a diagnostic, not a traceback
        c.diags.append(error("E9001", f"internal error in the checker: {type(exc).__name__}: {exc}",
                             Span(program.path, 1, 1, 1, 2), "please report this with the .eff file"))
    return CheckResult(program, sort_diagnostics(diags + c.diags), source, c.params, c.models, c.data, c.budget,
                       c.stage_infos, c.exports)


def check_source(text: str, path: str = "<input>", catalog: ModelCatalog | None = None,
                 overrides: dict[str, str] | None = None) -> CheckResult:
    parsed = parse(text, path)
    if parsed.program is None:
        return CheckResult(None, sort_diagnostics(parsed.diagnostics), parsed.source)
    return check(parsed.program, parsed.source, catalog, overrides)


def read_source(path: str) -> tuple[str | None, list[Diagnostic]]:
    """A file's text, or why it cannot be read (E0010: missing, unreadable, not UTF-8)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return data.decode("utf-8"), []
    except OSError as exc:
        return None, [error("E0010", f"cannot read '{path}': {exc.strerror or exc}",
                            Span(path, 1, 1, 1, 2), "check the path")]
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, [error("E0010", f"'{path}' is not UTF-8 text: byte 0x{data[exc.start]:02x} "
                            f"at line {line}, column {col}", Span(path, line, col, line, col + 1),
                            "save the file as UTF-8")]


def check_file(path: str, catalog: ModelCatalog | None = None,
               overrides: dict[str, str] | None = None) -> CheckResult:
    """Read and check a file; an unreadable or non-UTF-8 file is a diagnostic (E0010)."""
    text, diags = read_source(path)
    if text is None:
        return CheckResult(None, diags, "")
    return check_source(text, path, catalog, overrides)
