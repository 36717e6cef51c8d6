"""The build folder: every artifact of `effc build`, written so `effc show` can read it back.

    DIR/build.json            one entry per train step: stage, model, line, micro-batch, cost
    DIR/ir/NN_STAGE_MODEL.json   the step's IR (IR.from_json reads it back)
    DIR/ir/NN_STAGE_MODEL.txt    the same IR as a text dump, one line per node and param
    DIR/fx/NN_STAGE_MODEL.py     the torch.fx code the runtime executes for the step, after
                              the plan's kernel swaps
    DIR/plan.txt              the execution plan of every train step and the plan search's
                              ranking (build.json: the plan and its prediction as JSON)
    DIR/kernels.txt           every kernel swap that fired, with the source lines of the
                              code it replaced (build.json: as JSON)
    DIR/cost.txt              the cost table of every train step
    DIR/report.txt            per step: the passes and their rewrites, the calls in the
                              fx graph, trainable params and the predicted peak

Files are written to a temporary folder that replaces DIR only when complete, so a
crash never leaves a half-written build. The fx graph is built on the meta device: no
weight is allocated, whatever the model's size. `effc show --format dot|svg` adds
DIR/ir/NN_STAGE_MODEL.dot (and .svg) from the stored IR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from effc.compiler.cost import format_cost
from effc.compiler.ir import IR, dump
from effc.compiler.pipeline import Compiled, TrainBuild
from effc.compiler.search import format_search
from effc.compiler.swaps import KERNELS


def _name(i: int, b: TrainBuild) -> str:
    return f"{i:02d}_{b.stage}_{b.step.model.name}"


def _title(b: TrainBuild) -> str:
    return f"stage {b.stage}: train {b.step.model.name} (line {b.step.span.line}, micro-batch {b.micro_batch})"


def _where(ir: IR, ids) -> str:
    """The source lines of IR nodes: `file:line:col`, each once, in order."""
    spans = [ir.node(i).span for i in ids if i in ir and ir.node(i).span is not None]
    return ", ".join(dict.fromkeys(f"{s.file}:{s.line}:{s.col}" for s in spans)) or "-"


def _kernels(b: TrainBuild, fired) -> tuple[str, list[dict]]:
    rows = [{**f.to_json(), "source": _where(b.ir, f.ir)} for f in fired]
    width = max((len(r["kernel"]) for r in rows), default=0)
    lines = [f"{r['kernel']:{width}}  {r['node']}  <- {' + '.join(r['ir'])}  ({r['source']})" for r in rows]
    off = [k for k in KERNELS if k not in b.plan.kernels]
    head = f"# {_title(b)}: {len(rows)} swaps" + (f"; off by the plan: {', '.join(off)}" if off else "")
    return head + "\n" + "\n".join(lines) + "\n", rows


def _fx(b: TrainBuild) -> tuple[str, str, list]:
    """The step's fx code, a line counting the functions and modules the graph calls, and
    the swaps that fired."""
    from collections import Counter

    import torch

    from effc.compiler.to_fx import graph_output, to_fx

    gm = to_fx(b.ir, b.cost.seq, device=torch.device("meta"), kernels=b.plan.kernels)
    calls = Counter(getattr(n.target, "__name__", str(n.target)) if n.op == "call_function"
                    else type(gm.get_submodule(n.target)).__name__
                    for n in gm.graph.nodes if n.op in ("call_function", "call_module"))
    ops = ", ".join(f"{name} x{k}" for name, k in sorted(calls.items()))
    what = ("forward(tokens, keep) -> mean-pooled embeddings; the contrastive loss of each pair batch runs on "
            "them (runtime/contrastive.py)") if graph_output(b.ir) == "embedding" else \
        "forward(tokens, targets) -> summed cross-entropy"
    return f"# {_title(b)}: {what}\n" + gm.code.lstrip("\n"), ops, gm.meta["swaps"]


def _report(b: TrainBuild, ops: str) -> str:
    passes = ", ".join(f"{name} {k}" for name, k in b.report.rewrites)
    c = b.cost
    return (f"# {_title(b)}\n"
            f"passes (rewrites): {passes}\n"
            f"fx calls: {ops}\n"
            f"params: {c.params_trainable:,} trainable of {c.params_total:,}; predicted peak {c.peak_bytes / 2**20:.1f} MiB\n")


def write_build(compiled: Compiled, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "ir").mkdir()
        (tmp / "fx").mkdir()
        entries, tables, reports, plans, kernels = [], [], [], [], []
        for i, b in enumerate(compiled.builds):
            name = _name(i, b)
            (tmp / "ir" / f"{name}.json").write_text(b.ir.to_json(), encoding="utf-8")
            (tmp / "ir" / f"{name}.txt").write_text(dump(b.ir), encoding="utf-8")
            code, ops, fired = _fx(b)
            (tmp / "fx" / f"{name}.py").write_text(code, encoding="utf-8")
            reports.append(_report(b, ops))
            text, rows = _kernels(b, fired)
            kernels.append(text)
            plans.append(f"# {_title(b)}\n{b.plan.describe()}\n"
                         + (format_search(b.search, "the plan search", top=5) if b.search else ""))
            entries.append({"name": name, "stage": b.stage, "model": b.step.model.name,
                            "line": b.step.span.line, "micro_batch": b.micro_batch,
                            "passes": dict(b.report.rewrites), "cost": dataclasses.asdict(b.cost),
                            "plan": b.plan.to_json(), "swaps": rows,
                            "predicted": {"peak_bytes": b.memory, "step_seconds": b.time.seconds if b.time else None,
                                          "profile": b.time.profile if b.time else None}})
            tables.append(f"# {_title(b)}\n{format_cost(b.cost)}")
        (tmp / "build.json").write_text(json.dumps({"steps": entries}, indent=1), encoding="utf-8")
        (tmp / "cost.txt").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
        (tmp / "report.txt").write_text("\n".join(reports), encoding="utf-8")
        (tmp / "plan.txt").write_text("\n".join(plans), encoding="utf-8")
        (tmp / "kernels.txt").write_text("\n".join(kernels), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_section(out: Path, section: str) -> str:
    """The text `effc show` prints: section "ir" (every IR dump), "fx" (every fx graph's
    code), "cost", "report", "plan" or "kernels"."""
    out = Path(out)
    if section in ("cost", "report", "plan", "kernels"):
        path = out / f"{section}.txt"
        if not path.is_file():  # a folder written by an older effc
            return f"# no {section} in this build folder: build it again with this effc\n"
        return path.read_text(encoding="utf-8")
    folder, ext = {"ir": ("ir", "*.txt"), "fx": ("fx", "*.py")}[section]
    parts = [f"# {p.stem}\n{p.read_text(encoding='utf-8')}" for p in sorted((out / folder).glob(ext))]
    return "\n".join(parts)


def write_graphs(out: Path, fmt: str) -> list[Path]:
    """Graphviz files of every stored IR (`fmt` "dot" or "svg"), written next to it."""
    from effc.compiler.dot import render_svg, to_dot

    paths = []
    for p in sorted((Path(out) / "ir").glob("*.json")):
        text = to_dot(IR.from_json(p.read_text(encoding="utf-8")), p.stem)
        dot = p.with_suffix(".dot")
        dot.write_text(text, encoding="utf-8")
        if fmt == "svg":
            render_svg(text, p.with_suffix(".svg"))
            paths.append(p.with_suffix(".svg"))
        else:
            paths.append(dot)
    return paths
