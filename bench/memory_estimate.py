"""The cost model's memory estimate against a tensor-level measurement of the same
training step, for every train step of every example that trains a language model
(sentence encoders, which train on pairs, are left out).

    python bench/memory_estimate.py [--out bench/results/memory_estimate.json]

Measure: `effc.runtime.memory.LiveBytes`, the live bytes of distinct torch storages during
one full step (forward, backward, AdamW step) after a warm-up step; not process RSS.
Prints a table and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from effc.compiler.adapters import prefix_length
from effc.compiler.pipeline import compile_checked
from effc.compiler.swaps import COSTED
from effc.compiler.to_fx import graph_output, to_fx
from effc.lang.check import check_file
from effc.runtime.memory import measure_step, warm_adamw

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def measure(build) -> dict:
    c = build.cost
    seq = c.seq - prefix_length(build.ir)  # the cost counts a soft prompt's positions too
    gm = to_fx(build.ir, seq, kernels=COSTED)  # the kernels the cost model counts
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gm.parameters():
            if p.is_floating_point():
                p.normal_(0, 0.02)
            else:  # embedding_rows' row index: rows 0, 1, ...
                p.copy_(torch.arange(p.numel()))
    vocab = build.ir.node("embed").attrs.vocab
    x = torch.randint(0, vocab, (c.batch, seq))
    y = torch.randint(0, vocab, (c.batch, seq))
    m = measure_step(gm, list(gm.parameters()), warm_adamw(gm, x, y), x, y)
    return {"activations_est_mib": c.activation_bytes / MIB, "activations_measured_mib": m.activations / MIB,
            "peak_est_mib": c.peak_bytes / MIB, "peak_measured_mib": m.peak / MIB,
            "peak_ratio": c.peak_bytes / m.peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory_estimate.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    for path in sorted((ROOT / "examples").glob("*.eff")):
        for b in compile_checked(check_file(str(path))).builds:
            if graph_output(b.ir) != "loss":  # sentence encoders train on pairs: not measured here
                continue
            rows.append({"example": path.name, "stage": b.stage, "batch": b.cost.batch, "seq": b.cost.seq,
                         **measure(b)})
    head = f"{'example':24} {'stage':9} {'acts est':>9} {'acts meas':>9} {'peak est':>9} {'peak meas':>9} {'est/meas':>8}"
    print(head + "   (MiB, tensor-level)")
    for r in rows:
        print(f"{r['example']:24} {r['stage']:9} {r['activations_est_mib']:9.2f} {r['activations_measured_mib']:9.2f} "
              f"{r['peak_est_mib']:9.2f} {r['peak_measured_mib']:9.2f} {r['peak_ratio']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"measure": "live torch storage bytes (LiveBytes)", "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
