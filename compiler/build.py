"""The build folder: every artifact of `effc build`, written so `effc show` can read it back.

    DIR/build.json            one entry per train step: stage, model, line, micro-batch, cost
    DIR/ir/NN_STAGE_MODEL.json   the step's IR (IR.from_json reads it back)
    DIR/ir/NN_STAGE_MODEL.txt    the same IR as a text dump, one line per node and param
    DIR/cost.txt              the cost table of every train step

Files are written to a temporary folder that replaces DIR only when complete, so a
crash never leaves a half-written build. (The fx graph joins the folder with the fx
lowering.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from effc.compiler.cost import format_cost
from effc.compiler.ir import dump
from effc.compiler.pipeline import Compiled, TrainBuild


def _name(i: int, b: TrainBuild) -> str:
    return f"{i:02d}_{b.stage}_{b.step.model.name}"


def _title(b: TrainBuild) -> str:
    return f"stage {b.stage}: train {b.step.model.name} (line {b.step.span.line}, micro-batch {b.micro_batch})"


def write_build(compiled: Compiled, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "ir").mkdir()
        entries, tables = [], []
        for i, b in enumerate(compiled.builds):
            name = _name(i, b)
            (tmp / "ir" / f"{name}.json").write_text(b.ir.to_json(), encoding="utf-8")
            (tmp / "ir" / f"{name}.txt").write_text(dump(b.ir), encoding="utf-8")
            entries.append({"name": name, "stage": b.stage, "model": b.step.model.name,
                            "line": b.step.span.line, "micro_batch": b.micro_batch,
                            "passes": dict(b.report.rewrites), "cost": dataclasses.asdict(b.cost)})
            tables.append(f"# {_title(b)}\n{format_cost(b.cost)}")
        (tmp / "build.json").write_text(json.dumps({"steps": entries}, indent=1), encoding="utf-8")
        (tmp / "cost.txt").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_section(out: Path, section: str) -> str:
    """The text `effc show` prints: section "ir" (every IR dump) or "cost"."""
    out = Path(out)
    if section == "cost":
        return (out / "cost.txt").read_text(encoding="utf-8")
    parts = [f"# {p.stem}\n{p.read_text(encoding='utf-8')}" for p in sorted((out / "ir").glob("*.txt"))]
    return "\n".join(parts)
