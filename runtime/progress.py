"""What `effc run` shows while it works: a live progress bar on a terminal (step, loss,
tokens/s, ETA), a plain line every tenth of a train statement elsewhere, and a
one-screen summary at the end. Everything goes to stderr; stdout stays free."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from effc.runtime.run import Reporter, Summary


class ConsoleReporter(Reporter):
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self.live = self.stream.isatty()
        self.progress: Progress | None = None
        self.task = None
        self.steps = 0
        self.every = 1

    def line(self, text: str) -> None:
        self.console.print(text, markup=False)

    def stage(self, name: str, cached: bool) -> None:
        self.line(f"stage {name}" + (": cached (its statements and inputs are unchanged)" if cached else ""))

    def train_start(self, stage: str, model: str, steps: int, start: int) -> None:
        self.steps, self.every = steps, max(1, steps // 10)
        self.line(f"  train {model}: {steps} steps" + (f", resuming after step {start}" if start else ""))
        if self.live:
            self.progress = Progress(TextColumn("  step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s"),
                                     TimeRemainingColumn(), console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task("train", total=steps, completed=start, loss="-", speed="-")

    def train_step(self, m: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=m["step"], loss=f"{m['loss']:.4f}",
                                 speed=f"{m['tokens_per_s']:,.0f}")
        elif m["step"] % self.every == 0 or m["step"] == self.steps:
            self.line(f"  step {m['step']}/{self.steps}  loss {m['loss']:.4f}  lr {m['lr']:.2e}  "
                      f"{m['tokens_per_s']:,.0f} tok/s")

    def train_end(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def summary(self, s: Summary, run_dir) -> None:
        t = Table(title=f"run finished in {s.seconds:.1f} s: {run_dir}", title_justify="left")
        for col in ("stage", "what", "result", "time"):
            t.add_column(col)
        for st in s.stages:
            if st.get("cached"):
                t.add_row(st["stage"], "", "cached", "")
            elif "train" in st:
                loss = f"KL {st['loss']:.4f} to {st['distill']}" if st.get("distill") else f"loss {st['loss']:.4f}"
                t.add_row(st["stage"], f"train {st['train']} ({st['steps']} steps)", loss,
                          f"{st['seconds']:.1f} s, {st['tokens'] / max(st['seconds'], 1e-9):,.0f} tok/s")
                if st.get("plan"):
                    t.add_row("", "plan", st["plan"], "")
                if st.get("prediction"):
                    t.add_row("", "predicted", *prediction_text(st["prediction"]))
            elif "edit" in st:  # share, tie, prune, quantize
                t.add_row(st["stage"], st["edit"], st["result"], f"{st['seconds']:.1f} s")
        for e in s.evals:
            if "accuracy" in e:  # a sentence encoder: contrastive loss and top-1 retrieval
                res = f"loss {e['loss']:.4f}, top-1 {100 * e['accuracy']:.1f}%"
                if "against" in e:
                    a = e["against"]
                    res += f" (vs {a['model']}: {a['loss']:.4f}, top-1 {100 * a['accuracy']:.1f}%)"
                t.add_row(e["stage"], f"eval {e['model']} on {e['data']}", res, "")
                continue
            res = f"loss {e['loss']:.4f}, ppl {e['perplexity']:.2f}"
            if "against" in e:
                res += f" (vs {e['against']['model']}: {e['against']['loss']:.4f}, ppl {e['against']['perplexity']:.2f})"
            t.add_row(e["stage"], f"eval {e['model']} on {e['data']}", res, "")
        for path in s.exports:
            t.add_row("", "export", path, "")
        self.console.print(t)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def prediction_text(p: dict) -> tuple[str, str]:
    """The summary's row of predicted against measured: (memory, time)."""
    mem = f"peak {_size(p['predicted_peak'])}"
    if "measured_peak" in p:
        mem += f" (measured {_size(p['measured_peak'])}, {p['peak_measure']})"
    step = f"{p['predicted_step_s'] * 1e3:.1f} ms/step"
    if "measured_step_s" in p:
        step += f" (measured {p['measured_step_s'] * 1e3:.1f})"
    return mem, step
