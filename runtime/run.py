"""`effc run`: execute a checked pipeline's stages in order, inside a run folder.

    RUN/pipeline.eff            the source that ran, with the --set overrides on top
    RUN/run.json                effc version, file, overrides, threads, status
    RUN/metrics.jsonl           one JSON object a line: train steps and eval results
    RUN/stages/NN_NAME/key      the stage's cache key (below)
    RUN/stages/NN_NAME/train_K/ checkpoints of the stage's K-th train statement
    RUN/stages/NN_NAME/models/M.safetensors   model M as the stage left it (M@NAME)
    RUN/stages/NN_NAME/done.json              written last: the stage is complete

A stage's key hashes everything its result depends on: effc's version, the previous
stage's key, the stage's statements, the model/data/param/budget declarations with the
overrides applied, the contents of the data files, and the seeds (they are statement
options). A stage whose done.json holds its key is reused ("cached") without running;
any other stage runs, so editing a later stage reruns only it and what follows.

Nothing is written outside RUN except the export folders the file names; an existing
export is replaced only with `force`. Every file is written atomically.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import ChainMap
from dataclasses import dataclass, field
from pathlib import Path

import torch

from effc import __version__
from effc.compiler.adapters import adapter_index
from effc.compiler.adapters.embedding_rows import frequent_rows
from effc.compiler.ir import ADAPTERS, Op
from effc.compiler.pipeline import model_ir, plan_train, snapshot_until
from effc.compiler.plan import PlanError
from effc.compiler.profile import ProfileError, load_profile
from effc.lang import ast
from effc.lang.check import CheckResult, Ref, Step, hf_family
from effc.lang.diagnostics import Diagnostic, Span, error
from effc.lang.hf import HFConfigError, read_hf
from effc.lang.tokenizer_info import TokenizerError, read_tokenizer
from effc.runtime import data as D
from effc.runtime.checkpoint import (
    CheckpointError, atomic_write_json, atomic_write_text, read_tensors, write_tensors,
)
from effc.runtime import compress as C
from effc.runtime import distill
from effc.runtime import export as E
from effc.runtime.evaluate import embedding_similarity, evaluate, pair_embeddings, pair_metrics, similarity
from effc.runtime.hf import CheckpointReader, HFError
from effc.runtime import merge as M
from effc.runtime import distributed, planned
from effc.runtime.model import State, dense_ir, dense_state, materialize, merged_state, state_of
from effc.runtime.peft import PeftError, export_peft, read_peft
from effc.runtime.train import Hooks, Interrupted, TrainSpec, train

EVAL_BATCH = 8


@dataclass(frozen=True)
class RunOptions:
    out: Path
    resume: bool = False
    force: bool = False
    threads: int | None = None
    plan: tuple[tuple[str, str], ...] = ()  # --plan key=value overrides, applied to every train step
    memory: int | None = None  # --memory: the budget in bytes per process, replacing the file's
    device: str = "cpu"  # --device: where train steps run, "cpu" or "cuda" (this process's GPU)


class RunFailed(Exception):
    """The run cannot go on; the diagnostics say why and where."""

    def __init__(self, diagnostics: list[Diagnostic]):
        super().__init__("; ".join(d.message for d in diagnostics))
        self.diagnostics = diagnostics


class Reporter:
    """What the run tells a person; the CLI subclasses it with a progress bar."""

    def stage(self, name: str, cached: bool) -> None: ...
    def train_start(self, stage: str, model: str, steps: int, start: int) -> None: ...
    def train_step(self, m: dict) -> None: ...
    def train_end(self) -> None: ...
    def line(self, text: str) -> None: ...


@dataclass
class Summary:
    stages: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Stop:
    """SIGTERM and Ctrl-C ask the training loop to checkpoint and stop; a second one
    stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _code(line: str) -> str:
    """A line without its comment (a `#` outside a string starts one)."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif c == "#" and not quoted:
            return line[:i].rstrip()
    return line.rstrip()


def _text(source: str, span: Span) -> str:
    """The item's source without comments and blank lines: what a cache key reads."""
    lines = (_code(ln) for ln in source.splitlines()[span.line - 1: span.end_line])
    return "\n".join(ln for ln in lines if ln.strip())


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Run:
    def __init__(self, result: CheckResult, file: Path, opts: RunOptions, report: Reporter,
                 overrides: dict[str, str]):
        self.r, self.file, self.opts, self.rep = result, file, opts, report
        self.base = file.resolve().parent
        self.out = opts.out
        self.overrides = overrides
        self.states: dict[str, State] = {}
        self.sources: dict[str, CheckpointReader] = {}
        self.data: dict[str, D.Dataset] = {}
        self.pairs: dict[str, D.Pairs] = {}  # the same declaration read as an encoder's pairs
        # model -> linear path -> original weight minus its shared block's: what per-loop
        # adapters start from (runtime.compress.share), until they exist
        self.residuals: dict[str, dict] = {}
        self.choices: dict[str, list] = {}  # "line:col" of a drop_sublayers statement -> the layers it dropped
        self.stage_dirs: dict[str, Path] = {}
        self.stop = _Stop()
        self.profile = None  # the device profile the plan search reads, loaded at the first train
        self.main = distributed.is_main()  # with several processes, rank 0 alone writes and reports
        self.summary = Summary()
        # train steps run here; every other stage, and every state kept between stages, on the CPU
        self.device = torch.device("cuda", torch.cuda.current_device()) if opts.device == "cuda" else torch.device("cpu")
        self.stage_items = {i.name.name: i for i in result.program.items if isinstance(i, ast.Stage)}

    # ------------------------------------------------------------ helpers

    def fail(self, code: str, message: str, span: Span, hint: str | None = None):
        raise RunFailed([error(code, message, span, hint)])

    def _read_data(self, cache: dict, load, ref: Ref):
        """Data `ref` read by `load` once per run; a data error is E0501 at its declaration."""
        info = self.r.data[ref.name]
        if ref.name not in cache:
            try:
                cache[ref.name] = load(info.source, info.args, self.base)
            except D.DataError as e:
                self.fail("E0501", f"data '{ref.name}': {e.message}", info.span, e.hint)
        return cache[ref.name]

    def dataset(self, ref: Ref) -> D.Dataset:
        return self._read_data(self.data, D.load_data, ref)

    def pair_data(self, ref: Ref) -> D.Pairs:
        """A data declaration read as a sentence encoder's (anchor, positive) pairs."""
        return self._read_data(self.pairs, D.load_pairs, ref)

    def encoder(self, model: str) -> bool:
        """Whether the model is a sentence encoder: its graph returns embeddings."""
        return getattr(self.r.models[model].arch, "output", None) == "embedding"

    def split(self, ref: Ref) -> D.Split:
        ds = self.dataset(ref)
        return ds.validation if ref.split == "validation" else ds.train

    def metric(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def adapter_args(self, model: str, ir) -> dict:
        return adapter_args(self.r.models[model], ir)

    def source_of(self, model: str) -> CheckpointReader | None:
        """The checkpoint an `hf(...)` model starts from (None for other families), its
        names and shapes checked against config.json before any weight is read."""
        info = self.r.models[model]
        if info.family != "hf":
            return None
        if model not in self.sources:
            try:
                ir, _ = model_ir(self.r, model, info.span)
                reader = CheckpointReader(read_hf(str(info.args["path"]), info.args["seq"]), ir)
                reader.check()
            except (HFError, HFConfigError) as e:
                self.fail("E0504", f"model '{model}': {e.message}", info.span, e.hint)
            self.sources[model] = reader
        return self.sources[model]

    def current(self, model: str) -> State:
        """The live model's weights: what the last stage left, else its checkpoint (read
        lazily), else nothing (a fresh model is initialised from the seed)."""
        if model in self.states:
            return self.states[model]
        if self.r.models[model].merge is not None:
            self.states[model] = self.merged(model)
            return self.states[model]
        return self.source_of(model) or {}

    def merged(self, model: str) -> State:
        """A merge's state, made when the model is first used: each snapshot with its
        adapters folded in and its compressed storage undone, then combined
        (effc.runtime.merge)."""
        info = self.r.models[model]
        m = info.merge

        def dense(ref: Ref) -> State:
            state, until = self.snapshot(ref)
            ir, gm, _ = self.graph(ref.name, until, state, 0)
            return merged_state(dense_ir(ir), dense_state(ir, state_of(gm, ir)))

        t0 = time.perf_counter()
        operands = [dense(r) for r in m.operands]
        args = {k: v for k, v in m.args.items() if k != "base"}
        if "base" in m.args:
            args["base"] = dense(m.args["base"])
        try:
            state = getattr(M, m.technique)(operands, **args)
        except M.MergeError as e:
            self.fail("E0504", f"model '{model}': {e.message}", info.span, e.hint)
        names = ", ".join(f"{r.name}@{r.stage}" for r in m.operands)
        self.rep.line(f"  merged {model} = {m.technique}({names}) in {time.perf_counter() - t0:.1f}s")
        self.metric({"kind": "merge", "model": model, "technique": m.technique, "operands": names})
        return state

    def graph(self, model: str, until: Span | None, state: State, seed: int, output: str | None = None,
              kernels=None, ir=None):
        if ir is None:
            ir, _ = model_ir(self.r, model, until)
        seq = self.r.models[model].args["seq"]
        args = self.calibrated(ir, self.adapter_args(model, ir), state)
        residuals = self.residuals.get(model, {})
        args = {id: {**a, "residual": residuals[ir.node(id).attrs.target]}
                if a.get("per_loop") and ir.node(id).attrs.target in residuals else a for id, a in args.items()}
        if any("peft" in a for a in args.values()):  # imported adapters start from their tensors
            try:
                imported = read_peft(ir, args, hf_family(self.r.models[model]))
            except PeftError as e:
                self.fail("E0504", f"model '{model}': {e.message}", self.r.models[model].span, e.hint)
            state = ChainMap(state, imported)
        gm, fresh = materialize(ir, seq, state, seed, args, output, kernels)
        return ir, gm, fresh

    def calibrated(self, ir, args: dict, state: State) -> dict:
        """embedding_rows(count=N, calibrate=D): the N most frequent ids of D choose a fresh
        index (`rows` in the node's args); an index the state holds (a snapshot) is never
        chosen again."""
        for n in ir.nodes():
            a = args.get(n.id, {})
            if n.op is not Op.EMBEDDING_ROWS or not a.get("calibrate") or n.params[0].tied_to \
                    or f"{n.id}.index" in state:
                continue
            # the checker has compared the data's vocabulary with the model's (E0405)
            ids, vocab = self.split(a["calibrate"]).tokens, ir.node(n.attrs.target).attrs.vocab
            args = {**args, n.id: {**a, "rows": frequent_rows(ids, vocab, a["count"])}}
        return args

    def snapshot(self, ref: Ref) -> tuple[State, Span | None]:
        path = self.stage_dirs[ref.stage] / "models" / f"{ref.name}.safetensors"
        until = snapshot_until(self.r, ref.stage)
        if not path.exists() and self.source_of(ref.name) is not None:
            return self.source_of(ref.name), until  # nothing had changed it yet: still its checkpoint
        return self._read(path), until

    def _read(self, path: Path) -> State:
        try:
            return read_tensors(path)
        except CheckpointError as e:
            self.fail("E0503", e.message, Span(str(self.file), 1, 1, 1, 1), e.hint)

    # ------------------------------------------------------------ keys and folders

    @functools.cached_property
    def _declarations(self) -> str:
        kinds = (ast.Param, ast.ModelDecl, ast.DataDecl, ast.Budget)
        return "\n".join(_text(self.r.source, i.span) for i in self.r.program.items if isinstance(i, kinds))

    @functools.cached_property
    def _data_digests(self) -> dict:
        """Read once per run: every stage's key includes them."""
        out = {}
        for name, info in sorted(self.r.data.items()):
            path = info.args.get("path")
            if path:
                p = (self.base / str(path))
                out[name] = _file_digest(p) if p.is_file() else "missing"
            elif info.source == "stdlib_text":
                out[name] = sys.version
            tok = str(info.args.get("tokenizer", "bytes"))
            if tok != "bytes":  # the same text through another tokenizer is other data
                try:
                    t = read_tokenizer(str(self.base / tok))
                    files = [Path(t.file), Path(t.file).with_name("tokenizer_config.json")]
                    out[f"{name}:tokenizer"] = [_file_digest(f) for f in files if f.is_file()]
                except TokenizerError:
                    out[f"{name}:tokenizer"] = "missing"
        return out

    @functools.cached_property
    def _checkpoint_stamps(self) -> dict:
        """Each hf(...) and peft(...) folder's files with their sizes and modification times: cheap to
        read for a checkpoint of any size, and changed by any rewrite of its weights."""
        out = {}
        folders = [(name, str(info.args["path"])) for name, info in sorted(self.r.models.items()) if info.family == "hf"]
        folders += [(f"{name}:peft{i}", u.args["peft"]) for name, info in sorted(self.r.models.items())
                    for i, u in enumerate(info.adapters) if "peft" in u.args]  # imported adapters' folders
        for key, path in folders:
            folder = Path(path)
            out[key] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                              for f in folder.iterdir() if f.is_file()) if folder.is_dir() else "missing"
        return out

    def stage_key(self, index: int, prev: str) -> str:
        stage = self.r.stages[index]
        return _sha({"effc": __version__, "prev": prev, "stage": _text(self.r.source, self.stage_items[stage.name].span),
                     "decls": self._declarations, "params": self.r.params, "data": self._data_digests,
                     "checkpoints": self._checkpoint_stamps})

    # ------------------------------------------------------------ the run

    def run(self) -> Summary:
        t0 = time.perf_counter()
        self.preflight()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            header = "".join(f"# --set {k}={v}\n" for k, v in self.overrides.items())
            atomic_write_text(self.out / "pipeline.eff", header + self.r.source)
        self._status("running")
        self._repair_metrics()
        distributed.barrier()  # every rank has checked the export folders before any is written
        prev = ""
        try:
            with self.stop:
                for i, stage in enumerate(self.r.stages):
                    prev = self.run_stage(i, prev)
                for step in self.r.exports:
                    self.export(step, None)
        except Interrupted:
            self._status("interrupted")
            raise
        except RunFailed:
            self._status("failed")
            raise
        self.summary.seconds = time.perf_counter() - t0
        self._status("done")
        return self.summary

    def _status(self, status: str) -> None:
        if not self.main:
            return
        atomic_write_json(self.out / "run.json", {
            "effc": __version__, "file": str(self.file), "overrides": self.overrides,
            "threads": torch.get_num_threads(), "status": status})

    def _repair_metrics(self) -> None:
        """A kill can leave half a line at the end of metrics.jsonl: drop it."""
        path = self.out / "metrics.jsonl"
        if self.main and path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                atomic_write_text(path, data[: data.rfind(b"\n") + 1].decode("utf-8", "replace"))

    def preflight(self) -> None:
        """Refuse before anything runs: an export that would overwrite a folder."""
        if self.opts.force:
            return
        steps = [s for st in self.r.stages for s in st.steps if s.kind == "export"] + list(self.r.exports)
        for s in steps:
            target = self.base / s.path
            if target.exists():
                self.fail("E0502", f"export folder '{s.path}' exists ({target})", s.span,
                          "pass --force to replace it, or export to another path")

    def run_stage(self, i: int, prev: str) -> str:
        stage = self.r.stages[i]
        folder = self.out / "stages" / f"{i:02d}_{stage.name}"
        self.stage_dirs[stage.name] = folder
        key = self.stage_key(i, prev)
        done = folder / "done.json"
        if _done_key(done) == key:
            self.rep.stage(stage.name, cached=True)
            self.restore_choices(folder)
            for f in sorted((folder / "models").glob("*.safetensors")):
                self.states[f.stem] = self._read(f)
            self.summary.stages.append({"stage": stage.name, "cached": True})
            return key
        if self.main:
            if folder.exists() and (folder / "key").is_file() and (folder / "key").read_text().strip() != key:
                shutil.rmtree(folder)  # the stage changed: its old checkpoints no longer apply
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "key", key + "\n")
        distributed.barrier()  # the folder is settled before any rank reads a checkpoint in it
        self.rep.stage(stage.name, cached=False)
        t0 = time.perf_counter()
        trains = 0
        for step in stage.steps:
            if step.kind == "train":
                self.train(stage.name, step, folder / f"train_{trains}")
                trains += 1
            elif step.kind == "eval":
                self.eval(stage.name, step)
            elif step.kind == "export":
                self.export(step, stage.name)
            else:
                self.compress(stage.name, step)
        if self.main:
            for done_train in folder.glob("train_*"):  # finished: its checkpoints are no longer needed
                shutil.rmtree(done_train)
            (folder / "models").mkdir(exist_ok=True)
            for name, state in self.states.items():
                write_tensors(folder / "models" / f"{name}.safetensors", state)
            atomic_write_json(done, {"key": key, "seconds": time.perf_counter() - t0})
        distributed.barrier()  # later stages read the snapshots rank 0 wrote
        self.summary.stages.append({"stage": stage.name, "cached": False, "seconds": time.perf_counter() - t0})
        return key

    def train(self, stage: str, step: Step, ckpt: Path) -> None:
        model = step.model.name
        spec = TrainSpec.from_options(step.options)
        ds = self.pair_data(step.data) if self.encoder(model) else self.dataset(step.data)
        if isinstance(ds, D.Pairs) and spec.batch > len(ds.train):
            self.fail("E0501", f"data '{step.data.name}' has {len(ds.train)} train pairs, fewer than "
                      f"batch={spec.batch}", step.span,
                      "lower batch: a batch holds distinct pairs, since a repeated positive would be counted as "
                      "its own negative")
        ir, _ = model_ir(self.r, model, step.span)
        plan, predicted = self.plan_of(ir, step)
        spec = dataclasses.replace(spec, accumulate=plan.accumulate)
        teacher = step.options.get("distill_from")
        kernels = plan.kernels if teacher is None else tuple(k for k in plan.kernels if k in distill.KERNELS)
        ir, gm, fresh = self.graph(model, step.span, self.current(model), spec.seed, kernels=kernels, ir=ir)
        if teacher is not None:
            state, until = self.snapshot(teacher) if teacher.stage else (self.current(teacher.name), step.span)
            _, tgm, _ = self.graph(teacher.name, until, state, 0, "logits")
            gm = distill.attach(gm, tgm, step.options["temperature"])
        gm.to(self.device)  # in place: the same Parameter objects (and the teacher's, attached)
        swaps = collections.Counter(f.kernel for f in gm.meta.get("swaps", []))
        self.rep.line(f"  plan: {plan.describe()}" + (f"; {sum(swaps.values())} kernel swaps ("
                      + ", ".join(f"{k} {n}" for k, n in swaps.items()) + ")" if swaps else ""))
        if self.device.type == "cuda":
            self.rep.line(f"  device: {self.device} ({torch.cuda.get_device_name(self.device)})")
        self.rep.line(f"  predicted: {predicted.time.seconds * 1e3:.1f} ms a step, peak "
                      f"{predicted.memory / 2**20:.1f} MiB a process (profile: {predicted.time.profile})")
        self.metric({"kind": "plan", "stage": stage, "model": model, "plan": plan.to_json(), "swaps": dict(swaps)})
        dp = None
        if plan.world > 1 or plan.offload:  # DDP or FSDP2 around the planned forward, compiled last (compile(DDP(m)))
            distributed.init_single(self.device.type)  # one process offloading: FSDP2 needs a process group
            own = plan.fsdp is not None  # FSDP2: a group a layer, each owning its params
            dp = distributed.DataParallel(gm, planned.forward_of(gm, dataclasses.replace(plan, compile=False), own),
                                          plan.fsdp or "none", plan.offload)
            forward = torch.compile(dp.module) if plan.compile else dp.module
        else:
            forward = planned.forward_of(gm, plan)
        resume = self.opts.resume
        if not resume and ckpt.exists():
            self.rep.line(f"  found an interrupted train of '{model}': starting it over (--resume continues it)")
            if self.main:  # no other rank reads it: a fresh train never loads a checkpoint
                shutil.rmtree(ckpt)

        def on_start(start: int, meta: dict):
            self.rep.train_start(stage, model, spec.steps, start)
            if start and meta.get("threads") not in (None, torch.get_num_threads()):
                self.rep.line(f"  note: the checkpoint was written with {meta['threads']} threads, this run uses "
                              f"{torch.get_num_threads()}: the curve continues, but not bit for bit")
            if start and meta.get("world", 1) != plan.world:
                n = meta.get("world", 1)
                self.rep.line(f"  note: the checkpoint was written by {n} process{'es' * (n != 1)}, this run has "
                              f"{plan.world}: the curve continues, but not bit for bit")

        durations: list[float] = []  # seconds of each step this run took

        def on_step(m):
            rec = {"kind": "train", "stage": stage, "model": model, **m}
            durations.append(m["elapsed_s"] - sum(durations))
            self.metric(rec)
            self.rep.train_step(rec)

        def on_eval(m):
            self.metric({"kind": "eval", "stage": stage, "model": model, "data": f"{step.data.name}.validation", **m})
            self.rep.line(f"  step {m['step']}: validation {eval_result(m, ['perplexity'])}")

        hooks = Hooks(on_start, on_step, on_eval, lambda: self.stop.requested)
        try:
            res = train(gm, ir, ds, spec, ckpt, resume, hooks, EVAL_BATCH, forward,
                        lambda: planned.precision(plan, self.device.type), dp, measure=not plan.compile,
                        device=self.device)
        except CheckpointError as e:
            self.fail("E0503", e.message, step.span, e.hint)
        finally:
            self.rep.train_end()
        if dp is not None:
            dp.unwrap()  # full, plain tensors for the stages that follow
        self.states[model] = state_of(gm, ir)
        self.summary.stages.append({"stage": stage, "train": model, "loss": res["loss"], "steps": spec.steps,
                                    "tokens": res["tokens"], "seconds": res["seconds"],
                                    "distill": f"{teacher.name}@{teacher.stage}" if teacher and teacher.stage
                                    else (teacher.name if teacher else None),
                                    "plan": plan.describe(), **self.predicted_against_measured(predicted, durations, res["tensor_peak"])})
        self.metric({"kind": "prediction", "stage": stage, "model": model, **self.summary.stages[-1]["prediction"]})

    @staticmethod
    def predicted_against_measured(predicted, durations: list[float], tensor_peak: int | None) -> dict:
        """The plan's predicted step time and peak memory beside the run's: the median step
        after the first (which pays one-off costs), and the tensor-level peak of the run's
        second step (effc.runtime.memory.LiveBytes, the measure the cost model is checked
        against; not RSS, which holds the allocator's slack and torch's own buffers)."""
        out = {"predicted_step_s": predicted.time.seconds, "predicted_peak": predicted.memory,
               "profile": predicted.time.profile}
        steady = durations[1:] or durations
        if steady:
            out["measured_step_s"] = statistics.median(steady)
        if tensor_peak is not None:
            out["measured_peak"], out["peak_measure"] = tensor_peak, "tensor-level, step 2"
        return {"prediction": out}

    def plan_of(self, ir, step: Step):
        """The execution plan of a train step (`ir`: its model's IR) and its prediction: the
        plan search's choice (effc.compiler.pipeline.plan_train, as `effc build` makes it)
        under the budget, for this run's processes, with the --plan overrides pinned."""
        where = Span("<command line>", 1, 1, 1, 2)
        world = distributed.world()
        if step.options["batch"] < world:
            self.fail("E0114", f"batch={step.options['batch']} cannot be shared by {world} processes", step.span,
                      f"use batch={world} or more, or fewer processes")
        if self.profile is None:
            try:
                self.profile = load_profile()
            except ProfileError as e:
                self.fail("E0115", e.message, Span(e.path or "<profile>", 1, 1, 1, 2), e.hint)
        budget = self.opts.memory
        if budget is None and self.r.budget and self.r.budget.get("memory") is not None:
            budget = self.r.budget["memory"].n
        try:
            chosen, _ = plan_train(self.r, step, ir, list(self.opts.plan), budget, world, self.profile)
        except PlanError as e:
            self.fail("E0112", e.message, where, e.hint)
        plan = chosen.plan
        errors, notes = planned.problems(plan, self.device.type)
        for message, hint in errors:
            self.fail("E0112", message, where, hint)
        for note in notes:
            self.rep.line(f"  note: {note}")
        return plan, chosen

    def restore_choices(self, folder: Path) -> None:
        """A cached stage's run-time choices (which sublayers drop_sublayers removed): the
        IR of every later statement depends on them."""
        try:
            choices = json.loads((folder / "choices.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        for info in self.r.models.values():
            for e in info.edits:
                if _at(e.span) in choices:
                    e.args["dropped"] = choices[_at(e.span)]
                    self.choices[_at(e.span)] = choices[_at(e.span)]

    def compress(self, stage: str, step: Step) -> None:
        """share, prune, quantize: the model's state rewritten to match its IR after the
        statement (effc.runtime.compress), with calibration data where the method reads it."""
        model, e = step.model.name, step.edit
        # the reference graph: calibration reads the output of every IR node by name
        ir, gm, _ = self.graph(model, step.span, self.current(model), 0, kernels="none")
        state = state_of(gm, ir)
        stats = None
        ref = e.args.get("calibrate")
        if ref is not None and (e.technique == "wanda" or e.args.get("method") == "gptq"):
            stats = C.calibrate(gm, ir, [p for p in e.paths if p in ir], self.split(ref), self.dataset(ref).seq,
                                e.args["samples"], hessian=e.verb == "quantize")
        t0 = time.perf_counter()
        if e.technique == "drop_sublayers":
            sims = C.sublayer_similarity(gm, ir, list(e.paths), e.args["kind"], self.split(ref),
                                         self.dataset(ref).seq, e.args["samples"])
            done = C.drop_sublayers(e, state, sims)
            self.choices[_at(step.span)] = e.args["dropped"]
            if self.main:
                atomic_write_json(self.stage_dirs[stage] / "choices.json", self.choices)
        elif e.verb == "tie":
            done = C.tie(e, state)
        elif e.verb == "share":
            done = C.share(e, state)
            self.residuals[model] = done.residuals
        elif e.verb == "prune":
            done = C.prune(e, ir, state, stats)
        else:
            done = C.quantize(e, ir, state, stats)
        self.states[model] = done.state
        seconds = time.perf_counter() - t0
        self.metric({"kind": e.verb, "stage": stage, "model": model, "technique": e.technique,
                     "seconds": seconds, **done.record})
        self.rep.line(done.line)
        self.summary.stages.append({"stage": stage, "edit": f"{e.verb} {model} ({e.technique})",
                                    "result": done.line.strip().split(": ", 1)[-1], "seconds": seconds})

    def eval(self, stage: str, step: Step) -> None:
        model, o = step.model.name, step.options
        encoder = self.encoder(model)  # the checker lets only an encoder be compared with an encoder
        if encoder:
            pairs = self.pair_data(step.data)
            split = pairs.validation if step.data.split == "validation" else pairs.train
            embedded = []  # each measured model's embeddings, in order: similarity compares them

            def measure(g):
                embedded.append(pair_embeddings(g, split, EVAL_BATCH, o["samples"]))
                return pair_metrics(*embedded[-1])
        else:
            split = self.split(step.data)
            seq = self.dataset(step.data).seq
            measure = lambda g: evaluate(g, split, seq, EVAL_BATCH, o["samples"])  # noqa: E731
        ir, gm, fresh = self.graph(model, step.span, self.current(model), 0)
        if fresh:  # first use: these weights are the model's from now on (and in its snapshot)
            self.states[model] = state_of(gm, ir)
        rec = {"kind": "eval", "stage": stage, "model": model,
               "data": f"{step.data.name}" + (f".{step.data.split}" if step.data.split else ""),
               **measure(gm)}
        against = o.get("against")
        if against is not None:
            state, until = self.snapshot(against) if against.stage else (self.current(against.name), step.span)
            _, other, _ = self.graph(against.name, until, state, 0)
            name = against.name + (f"@{against.stage}" if against.stage else "")
            rec["against"] = {"model": name, **measure(other)}
            if "similarity" in o["metrics"] and encoder:
                rec["similarity"] = embedding_similarity(embedded[0], embedded[1])
            elif "similarity" in o["metrics"]:
                _, a, _ = self.graph(model, step.span, self.current(model), 0, "logits")
                _, b, _ = self.graph(against.name, until, state, 0, "logits")
                rec["similarity"] = similarity(a, b, split, seq, EVAL_BATCH, o["samples"])
        self.metric(rec)
        self.summary.evals.append(rec)
        self.rep.line(_eval_line(rec, o["metrics"]))

    def export(self, step: Step, stage: str | None) -> None:
        try:
            self._export(step, stage)
        except OSError as e:
            self.fail("E0503", f"cannot write the export folder '{step.path}': {e.strerror or e}", step.span,
                      "check the folder's permissions and free space, or export to another path")

    def _export(self, step: Step, stage: str | None) -> None:
        model = step.model.name
        if step.model.stage:
            state, until = self.snapshot(step.model)
        else:
            state, until = self.current(model), (step.span if stage else None)
        ir, gm, fresh = self.graph(model, until, state, 0)
        state = state_of(gm, ir)
        if fresh and not step.model.stage:
            self.states[model] = state
        if not self.main:  # rank 0 writes the export
            return
        info = self.r.models[model]
        merge, fmt = step.options["merge_adapters"], step.options["format"]
        target = self.base / step.path
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=_mkdir(target.parent)))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; an export is an ordinary folder
        try:
            try:
                if fmt == "hf":
                    adapters = E.export_hf(tmp, ir, state, info, self.source_of(model))
                elif fmt == "compressed_tensors":
                    adapters = E.export_compressed_tensors(tmp, ir, state, info, self.source_of(model))
                elif fmt == "peft":
                    adapters = export_peft(tmp, ir, state, info, self.source_of(model), target)
                else:
                    edits = [e for e in info.edits if until is None or (e.span.line, e.span.col) < (until.line, until.col)]
                    adapters = E.export_effc(tmp, ir, state, info, merge, self.r.program.name or self.file.stem, edits)
            except (E.ExportError, PeftError) as e:
                self.fail("E0504", e.message, step.span, e.hint)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        self.summary.exports.append(str(target))
        self.rep.line(f"  exported {model} to {step.path}" + (" (adapters merged)" if merge and adapters else ""))
        masked = [a["masked_norm"] for a in adapters if "masked_norm" in a]
        if masked:
            self.rep.line(f"  {len(masked)} adapters merged into pruned weights: the masks removed "
                          f"{100 * sum(masked) / len(masked):.1f}% of their updates' norm on average (at most "
                          f"{100 * max(masked):.1f}%)")


def adapter_args(info, ir) -> dict:
    """Adapter node id -> its technique's checked arguments (its initialisation reads
    them): a node's id ends in the number of the adapt statement that made it."""
    return {n.id: info.adapters[adapter_index(n.id)].args for n in ir.nodes() if n.op in ADAPTERS}


def _at(span: Span) -> str:
    return f"{span.line}:{span.col}"


def _done_key(done: Path) -> str | None:
    """The key a completed stage recorded; None if it never completed (or the file is damaged)."""
    try:
        return json.loads(done.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def eval_result(m: dict, metrics: list) -> str:
    """One evaluation's numbers: a language model's loss (and perplexity when asked for),
    or an encoder's contrastive loss and top-1 retrieval accuracy among the N pairs."""
    if "accuracy" in m:
        return f"loss {m['loss']:.4f}, top-1 retrieval {100 * m['accuracy']:.1f}% of {m['pairs']} pairs"
    ppl = [f"perplexity {m['perplexity']:.2f}"] if "perplexity" in metrics else []
    return ", ".join([f"loss {m['loss']:.4f}"] + ppl)


def _eval_line(rec: dict, metrics: list) -> str:
    text = f"  eval {rec['model']} on {rec['data']}: " + eval_result(rec, metrics)
    if "against" in rec:
        text += f"  | {rec['against']['model']}: " + eval_result(rec["against"], metrics)
    if "similarity" in rec:
        text += f"  | similarity {rec['similarity']:.4f}"
    return text


def run_pipeline(result: CheckResult, file: Path, opts: RunOptions, report: Reporter | None = None,
                 overrides: dict[str, str] | None = None) -> Summary:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    distributed.init(opts.device)  # a worker of `effc run --nproc N` joins its process group; otherwise nothing
    try:
        return _Run(result, file, opts, report or Reporter(), overrides or {}).run()
    finally:
        distributed.close()
