"""`effc plot RUN`: the loss and learning-rate curves of a run, as PNG files.

    RUN/metrics.jsonl   read: one JSON object a line, `kind` "train" or "eval" (runtime/run.py)
    OUT/loss.png        training loss per stage, eval results as markers
    OUT/lr.png          the learning rate the optimizer used at each step

Steps count from 1 within a stage, so the x axis is a global step: stage k's steps continue
after stage k-1's last one, in the order the stages first appear in the file. Plotting uses
matplotlib's object API (`Figure` + the Agg canvas): no pyplot, no backend switch, nothing
global changed in a process that also trains.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

FIGSIZE_IN = (8.0, 4.5)
DPI = 100  # 8 x 4.5 in at 100 dpi: 800 x 450 px, what the tests check in the PNG header

KINDS = ("train", "eval")
_HINT_FORMAT = "metrics.jsonl holds one JSON object a line, as `effc run` writes it; was it edited by hand?"


class PlotError(Exception):
    """A run folder that cannot be plotted; message and hint are for the user."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


# ---------------------------------------------------------------- reading


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _problem(rec) -> str | None:
    """What is wrong with one decoded line, or None. Keys not named here are ignored."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, found {type(rec).__name__}"
    kind = rec.get("kind")
    if not isinstance(kind, str):
        return "no string 'kind'"
    if kind not in KINDS:
        return None  # a kind this version does not plot: skipped, not an error
    if not isinstance(rec.get("stage"), str) or not rec["stage"]:
        return f"{kind} record without a 'stage' name"
    step = rec.get("step")
    step_ok = isinstance(step, int) and not isinstance(step, bool) and step >= 1
    if (kind == "train" or step is not None) and not step_ok:
        return f"{kind} record with 'step' {step!r}: expected an integer >= 1"
    if not _is_number(rec.get("loss")):
        return f"{kind} record without a numeric 'loss'"
    if kind == "train" and not _is_number(rec.get("lr")):
        return "train record without a numeric 'lr'"
    against = rec.get("against")
    if kind == "eval" and against is not None and not (isinstance(against, dict) and _is_number(against.get("loss"))):
        return "eval record whose 'against' has no numeric 'loss'"
    return None


def read_metrics(path: Path) -> list[dict]:
    """The train and eval records of a metrics.jsonl, as the run finally left them.

    A resumed run logs again the steps after its last checkpoint, and a stage edited and
    rerun logs again from step 1; so a train line at step s of stage X supersedes every
    earlier line of X at step >= s (for a repeated (stage, step) the later line wins). An
    eval supersedes an earlier one with the same stage, step (or none: an `eval`
    statement), model, data and reference. Records come grouped by stage, stages in the order
    they first appear in the file, each stage's records in file order.

    Blank lines and records of other kinds are skipped, and so is a last line with no
    newline that does not parse: a kill leaves one, and `effc run` drops it on resume.
    """
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"no metrics file at {path}",
                        "`effc run FILE --out RUN` writes RUN/metrics.jsonl: is this a run folder?")
    data = path.read_bytes()
    lines = data.split(b"\n")
    entries: list[tuple[int, dict]] = []  # (1-based line number, record)
    alive: list[bool] = []  # False once a later line superseded the entry
    first_seen: dict[str, int] = {}  # stage -> rank of its first line in the file
    top: dict[str, int] = {}  # stage -> highest train step logged so far
    evals: dict[tuple, int] = {}  # an eval's identity -> its entry index
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if n == len(lines):  # no newline after it: a line cut off by a kill
                continue
            raise PlotError(f"{path}:{n}: not a JSON line ({e})", _HINT_FORMAT) from None
        problem = _problem(rec)
        if problem is not None:
            raise PlotError(f"{path}:{n}: {problem}", _HINT_FORMAT)
        if rec["kind"] not in KINDS:
            continue
        stage, step = rec["stage"], rec.get("step")
        first_seen.setdefault(stage, len(first_seen))
        if rec["kind"] == "train":
            if step <= top.get(stage, 0):  # a restart: what this stage logged from `step` on is stale
                for i, (_, old) in enumerate(entries):
                    if alive[i] and old["stage"] == stage and old.get("step") is not None and old["step"] >= step:
                        alive[i] = False
            top[stage] = step
        else:
            key = (stage, step, rec.get("model"), rec.get("data"), (rec.get("against") or {}).get("model"))
            if key in evals:
                alive[evals[key]] = False
            evals[key] = len(entries)
        entries.append((n, rec))
        alive.append(True)
    kept = [(first_seen[rec["stage"]], n, rec) for (n, rec), ok in zip(entries, alive) if ok]
    if not kept:
        raise PlotError(f"{path} has no train or eval records",
                        "the run has not logged a step yet: plot it again once it has")
    return [rec for _, _, rec in sorted(kept, key=lambda t: t[:2])]


# ---------------------------------------------------------------- the global step axis


def stage_spans(records: list[dict]) -> list[tuple[str, int, int]]:
    """(stage, offset, end) in first-appearance order: stage X's step s is global step
    offset + s, and X ends at global step `end`. A stage's length is its highest train
    step (its highest eval step when it trained nothing, else 0)."""
    longest: dict[str, int] = {}
    trained: dict[str, int] = {}
    for r in records:
        longest.setdefault(r["stage"], 0)
        if r.get("step") is not None:
            longest[r["stage"]] = max(longest[r["stage"]], r["step"])
            if r["kind"] == "train":
                trained[r["stage"]] = max(trained.get(r["stage"], 0), r["step"])
    spans, offset = [], 0
    for stage in longest:
        end = offset + trained.get(stage, longest[stage])
        spans.append((stage, offset, end))
        offset = end
    return spans


def global_steps(records: list[dict]) -> list[tuple[int, dict]]:
    """Each record with its global step. An eval without a step (an `eval` statement) sits
    at the last train step of its stage logged before it: where in the stage it ran."""
    offset = {stage: start for stage, start, _ in stage_spans(records)}
    last: dict[str, int] = {}
    out = []
    for r in records:
        stage = r["stage"]
        step = r.get("step")
        x = offset[stage] + (step if step is not None else last.get(stage, 0))
        if r["kind"] == "train":
            last[stage] = step
        out.append((x, r))
    return out


# ---------------------------------------------------------------- drawing


def _finite(v: float) -> float:
    # A diverged step logs inf; as NaN it becomes a gap instead of breaking the autoscale.
    return v if math.isfinite(v) else math.nan


def _new_figure():
    # Imported here: matplotlib costs ~0.4 s to import, and only `effc plot` needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> None:
    # print_png renders at the figure's own size and dpi: rc settings such as
    # savefig.bbox=tight cannot change the pixel size the caller was promised.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.canvas.print_png(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _stage_lines(ax, points: list[tuple[int, dict]], spans, key: str) -> None:
    """One line per stage of train[key], in the axis' colour cycle, and a dashed rule at
    each boundary between stages."""
    for i, (stage, _, _) in enumerate(spans):
        xy = sorted((x, _finite(r[key])) for x, r in points if r["kind"] == "train" and r["stage"] == stage)
        if xy:
            ax.plot([x for x, _ in xy], [y for _, y in xy], color=f"C{i}", linewidth=1.2, label=stage)
    for _, start, _ in spans[1:]:
        ax.axvline(start, color="0.5", linestyle="--", linewidth=0.8)


def _plot_loss(points, spans, title: str, path: Path) -> None:
    fig, ax = _new_figure()
    _stage_lines(ax, points, spans, "loss")
    evals = [(x, r) for x, r in points if r["kind"] == "eval"]
    if evals:
        ax.plot([x for x, _ in evals], [_finite(r["loss"]) for _, r in evals], linestyle="none",
                marker="D", markersize=6, color="black", label="eval")
    against = [(x, r["against"]) for x, r in evals if r.get("against")]
    if against:
        ax.plot([x for x, _ in against], [_finite(a["loss"]) for _, a in against], linestyle="none",
                marker="D", markersize=6, markerfacecolor="none", markeredgecolor="black",
                label="eval: reference (against)")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    _save(fig, path)


def _plot_lr(points, spans, title: str, path: Path) -> None:
    fig, ax = _new_figure()
    _stage_lines(ax, points, spans, "lr")
    if any(r["kind"] == "train" for _, r in points):
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no training steps logged", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{title}: learning rate")
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def plot_run(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write OUT/loss.png and OUT/lr.png (OUT defaults to the run folder); return their
    paths. Each is FIGSIZE_IN at DPI and is replaced atomically."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    points, spans = global_steps(records), stage_spans(records)
    title = run_dir.resolve().name or str(run_dir)
    loss_png, lr_png = out / "loss.png", out / "lr.png"
    _plot_loss(points, spans, title, loss_png)
    _plot_lr(points, spans, title, lr_png)
    return [loss_png, lr_png]
