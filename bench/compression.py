"""Every compression scheme on two real models: weight bytes, quality and time, through
`.eff` files run by `effc run`.

    python bench/compression.py [--threads 2] [--samples 256] [--work DIR]
                                [--decoder-run RUN] [--minilm DIR] [--only NAME ...]
                                [--out bench/results/compression.json]

Models.
- decoder: the tiny decoder of examples/quickstart.eff, stage `pretrain` (vocab 256,
  dim 192, 4 layers, 4 heads, ffn 512, seq 128; 300 steps of AdamW on stdlib_text), its
  declarations and stage copied verbatim (`param rank` included, though unused here:
  every declaration enters a stage's cache key), so effc's stage cache accepts the
  `pretrain` stage of `runs/quickstart` as well as one this benchmark trained.
- encoder: the pretrained all-MiniLM-L6-v2 (`effc init-checkpoint DIR --pretrained
  all-MiniLM-L6-v2`, no network), sentence pairs from examples/data/pairs.jsonl as in
  examples/minilm_pairs.eff.

How each configuration runs. Stages change the live model in order, so configurations
cannot follow one another in one file, and no statement resets a model to a snapshot.
Each configuration is therefore its own `.eff` file and its own run folder:

    stage pretrain | base:   the reference (identical text in every file)
    stage compress:          the one compression statement, alone
    stage measure:           eval ... against=tiny@pretrain | m@base

The reference stage runs once, in WORK/runs/MODEL/reference (`--decoder-run RUN` copies
RUN's `pretrain` stage there first); its folder is then copied into each configuration's
fresh run folder, where effc reuses it because its statements, declarations and data are
unchanged (the benchmark stops if a configuration run trains anything). Nothing is
retrained after compression.

Configurations (CONFIGS, data-driven): int8; int4 round-to-nearest, group 64; int4 GPTQ,
group 64; NF4, group 64 (double quantization, the default); 50% magnitude; 50% Wanda; 2:4
(magnitude); structured pruning of 25% of the heads and of 25% of the MLP channels; the
attention sublayer of one layer dropped. All on every linear of `layers[*]` (the embedding,
the decoder's head, norms and biases stay as they are). GPTQ, Wanda and drop_sublayers
calibrate on 32 sequences: the decoder's training data (stdlib, 128 tokens each); for the
encoder a `text(..., tokenizer=CHECKPOINT)` declaration over the queries and passages of
the pairs' train split (the first 95% of the records, written to WORK/data/calibration.txt;
64 tokens each), so no validation pair is seen. A configuration that `effc check` refuses
with E0302 (not implemented) is listed as "not available in this effc"; any other refusal
is listed with its diagnostic; both run automatically once effc accepts them.

What is measured, per configuration:
- weight bytes: the cost table's "bytes weights" (`effc.compiler.cost.estimate` on the
  model's IR after the statement, which is what `effc build` prints for a train step of
  that model), for the whole model and for the linears of `layers[*]` alone, against the
  same numbers before the statement (fp32). Pruned weights are stored dense, so their
  ratio is 1.000 and their zeros are reported as sparsity, not as a saving or a speed-up.
  As a cross-check the size of the compress stage's snapshot (safetensors) is recorded.
- quality, from the run's metrics.jsonl eval record, the reference numbers being its
  `against` part: the decoder's loss and perplexity on the first `--samples` (256 of
  699) windows of stdlib.validation; the encoder's mean cosine similarity to the
  uncompressed model's embeddings and top-1 retrieval accuracy over the 75 validation
  pairs, with the contrastive loss.
- time: the `seconds` of the statement's metrics record (the weight rewrite; for Wanda and
  GPTQ it excludes their calibration pass, for drop_sublayers it includes its similarity
  pass), the compress stage's wall time from its done.json (building the model,
  calibration, the rewrite and writing the snapshot), and the whole `effc run` process.

Every `effc run` gets `--threads` (default 2, this machine's cores). On the 2-core CPU
machine the documented table came from, the whole benchmark took about 9 minutes, 2.3 of
them training the decoder (skipped when its stage is reused). Prints one table per model
and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import effc
from effc.compiler.cost import DTYPE_BYTES, estimate
from effc.compiler.ir import Op
from effc.compiler.pipeline import compile_checked, model_ir
from effc.lang.check import check_file
from effc.lang.registry import MIN_PAIRS
from effc.runtime.data import VALIDATION_FRACTION

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20

# {m}: the model's name; {calib}: its calibration data. name -> statement.
CONFIGS = [
    ("int8", "quantize {m}.layers[*].**:linear to int8()"),
    ("int4 rtn g64", "quantize {m}.layers[*].**:linear to int4(group=64)"),
    ("int4 gptq g64", "quantize {m}.layers[*].**:linear to int4(group=64, method=gptq, calibrate={calib}, "
                      "samples=32)"),
    ("nf4 g64", "quantize {m}.layers[*].**:linear to nf4(group=64)"),
    ("magnitude 50%", "prune {m}.layers[*].**:linear with magnitude(sparsity=0.5)"),
    ("wanda 50%", "prune {m}.layers[*].**:linear with wanda(sparsity=0.5, calibrate={calib}, samples=32)"),
    ("2:4", "prune {m}.layers[*].**:linear with nm(n=2, m=4)"),
    ("heads 25%", "prune {m}.layers[*].attn with heads(fraction=0.25)"),
    ("channels 25%", "prune {m}.layers[*].mlp with channels(fraction=0.25)"),
    ("drop 1 attn", "prune {m}.layers[*] with drop_sublayers(kind=attn, count=1, calibrate={calib}, samples=32)"),
]

# examples/quickstart.eff's declarations and pretrain stage, verbatim (see the docstring).
DECODER_HEAD = """\
param rank = 8  # unused here; kept so the pretrain stage's cache key equals the quickstart's

model tiny = decoder(vocab=256, dim=192, layers=4, heads=4, ffn=512, seq=128)
data stdlib = stdlib_text(seq=128)  # bytes as tokens: 256 ids
data reference = text("../docs/language.md", seq=128)

budget(memory=4GiB)

stage pretrain:
    train tiny on stdlib (steps=300, batch=16, optimizer=adamw(lr=3e-3),
                          schedule=cosine(warmup=30), checkpoint_every=100)
    eval tiny on reference.validation (metrics=[loss, perplexity])
"""

ENCODER_HEAD = """\
model m = hf("{ckpt}", seq=64)
data pairs = jsonl("../data/pairs.jsonl", seq=64, prompt="query", response="passage",
                   tokenizer="{ckpt}")
data calib = text("../data/calibration.txt", seq=64, tokenizer="{ckpt}")

stage base:
    eval m on pairs.validation (metrics=[loss])
"""


class BenchError(Exception):
    pass


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def eff_file(model: str, name: str, head: str, statement: str | None, measure: str | None) -> str:
    text = f"# generated by bench/compression.py\npipeline compression_{model}_{slug(name)}\n\n{head}"
    if statement is not None:
        text += f"\nstage compress:\n    {statement}\n\nstage measure:\n    {measure}\n"
    return text


def effc_run(eff: Path, run: Path, threads: int, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run([sys.executable, "-m", "effc", "run", str(eff), "-o", str(run), "--threads", str(threads)],
                            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "NO_COLOR": "1"}).returncode
    return rc, time.perf_counter() - t0


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tail(log: Path, n: int = 6) -> str:
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return " / ".join(ln.strip() for ln in lines[-n:])


def check(eff: Path):
    """What `effc check` says: (result, errors) with the budget check of compile_checked."""
    result = check_file(str(eff))
    diags = list(result.diagnostics)
    if result.ok:
        diags += list(compile_checked(result).diagnostics)
    return result, [d for d in diags if d.severity == "error"]


def weight_bytes(result, model: str, until) -> tuple[int, int]:
    """(the cost table's weight bytes of the whole model, bytes of the linears in layers[*])."""
    ir, _ = model_ir(result, model, until)
    seq = result.models[model].args["seq"]
    whole = estimate(ir, 1, seq).weight_bytes
    linears = sum(p.numel * DTYPE_BYTES[p.dtype] for n in ir.nodes() if n.op is Op.LINEAR and n.id.startswith("layers[")
                  for p in n.params if p.tied_to is None)
    return whole, linears


def detail(rec: dict) -> str:
    if "sparsity" in rec:
        return f"zeros {100 * rec['sparsity']:.1f}%"
    if "relative_error" in rec:
        return f"weight err {rec['relative_error']:.4f}"
    if "kept" in rec:
        return f"kept {rec['kept']}/{rec['of']}"
    if "dropped" in rec:
        return "dropped " + ",".join(rec["dropped"])
    return ""


# ------------------------------------------------------------------------------ setup


def prepare(work: Path, minilm: Path | None, fresh_docs: bool) -> str:
    """The files the generated .eff files read; returns the checkpoint path as they write it."""
    (work / "eff").mkdir(parents=True, exist_ok=True)
    (work / "docs").mkdir(exist_ok=True)
    (work / "data").mkdir(exist_ok=True)
    # the quickstart's `reference` data, at the same relative path ("../docs/language.md"):
    # copied once (a later copy of a changed reference would retrain the pretrain stage),
    # and again for --decoder-run, whose stage was keyed on the repository's file
    if fresh_docs or not (work / "docs" / "language.md").exists():
        shutil.copyfile(ROOT / "docs" / "language.md", work / "docs" / "language.md")
    shutil.copyfile(ROOT / "examples" / "data" / "pairs.jsonl", work / "data" / "pairs.jsonl")
    records = [json.loads(ln) for ln in (work / "data" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
               if ln.strip()]
    cut = len(records) - max(len(records) // VALIDATION_FRACTION, MIN_PAIRS)  # effc's split (runtime.data)
    calib = "\n".join(f"{r['query']} {r['passage']}" for r in records[:cut]) + "\n"
    if not (work / "data" / "calibration.txt").exists() or \
            (work / "data" / "calibration.txt").read_text(encoding="utf-8") != calib:
        (work / "data" / "calibration.txt").write_text(calib, encoding="utf-8")
    if minilm is not None:
        return str(minilm.resolve())
    ckpt = work / "checkpoints" / "minilm"
    if not (ckpt / "config.json").exists():
        subprocess.run([sys.executable, "-m", "effc", "init-checkpoint", str(ckpt), "--pretrained",
                        "all-MiniLM-L6-v2"], check=True)
    return "../checkpoints/minilm"


def reference(work: Path, model: str, head: str, threads: int, seed_run: Path | None) -> dict:
    """Run (or reuse) the reference stage; returns what happened."""
    eff = work / "eff" / f"{model}_reference.eff"
    eff.write_text(eff_file(model, "reference", head, None, None), encoding="utf-8")
    run = work / "runs" / model / "reference"
    stage = "00_" + ("pretrain" if model == "decoder" else "base")
    if seed_run is not None:
        src = seed_run / "stages" / stage
        if not (src / "done.json").exists():
            raise BenchError(f"{seed_run} has no finished '{stage}' stage")
        shutil.rmtree(run, ignore_errors=True)
        (run / "stages").mkdir(parents=True)
        shutil.copytree(src, run / "stages" / stage)
    run.mkdir(parents=True, exist_ok=True)
    before = len(metrics(run))
    rc, seconds = effc_run(eff, run, threads, work / "runs" / model / "reference.log")
    if rc:
        raise BenchError(f"reference run of the {model} failed ({rc}): {tail(work / 'runs' / model / 'reference.log')}")
    trained = [m for m in metrics(run)[before:] if m["kind"] == "train"]
    note = (f"trained {len(trained)} steps" if trained else "reused (stage cache)")
    if seed_run is not None and trained:
        note += f": the pretrain stage of {seed_run} did not match this file"
    return {"run": str(run), "stage": stage, "seconds": seconds, "note": note}


# ------------------------------------------------------------------------------ one configuration


def configuration(work: Path, model: str, name: str, statement: str, head: str, measure: str,
                  ref: dict, threads: int) -> dict:
    row = {"config": name, "statement": statement}
    eff = work / "eff" / f"{model}_{slug(name)}.eff"
    eff.write_text(eff_file(model, name, head, statement, measure), encoding="utf-8")
    result, errors = check(eff)
    if errors:
        if any(d.code == "E0302" for d in errors):
            return {**row, "status": "skipped", "note": "not available in this effc"}
        d = errors[0]
        return {**row, "status": "refused", "note": f"effc check: {d.code} {d.message}"}
    run = work / "runs" / model / slug(name)
    shutil.rmtree(run, ignore_errors=True)
    (run / "stages").mkdir(parents=True)
    shutil.copytree(Path(ref["run"]) / "stages" / ref["stage"], run / "stages" / ref["stage"])
    log = work / "runs" / model / f"{slug(name)}.log"
    rc, seconds = effc_run(eff, run, threads, log)
    recs = metrics(run)
    if any(m["kind"] == "train" for m in recs):
        raise BenchError(f"{eff}: the reference stage was not reused from {ref['run']} (see {log})")
    row["run"], row["run_seconds"] = str(run), seconds
    if rc:
        return {**row, "status": "failed", "note": f"effc run exit {rc}: {tail(log)}"}
    comp = next(m for m in recs if m.get("stage") == "compress")
    ev = next(m for m in recs if m["kind"] == "eval" and m.get("stage") == "measure")
    mname = comp["model"]
    span = next(s.span for st in result.stages if st.name == "compress" for s in st.steps)
    dense, dense_lin = weight_bytes(result, mname, span)
    after, after_lin = weight_bytes(result, mname, None)
    snap = run / "stages" / "01_compress" / "models" / f"{mname}.safetensors"
    done = json.loads((run / "stages" / "01_compress" / "done.json").read_text(encoding="utf-8"))
    return {**row, "status": "ok", "note": detail(comp),
            "weight_bytes": after, "dense_bytes": dense, "ratio": after / dense,
            "linear_bytes": after_lin, "dense_linear_bytes": dense_lin,
            "linear_ratio": after_lin / dense_lin if dense_lin else None,
            "snapshot_bytes": snap.stat().st_size if snap.exists() else None,
            "statement_seconds": comp["seconds"], "stage_seconds": done["seconds"],
            "record": comp, "eval": ev}


# ------------------------------------------------------------------------------ tables


def _common(r: dict) -> str:
    return (f"{r['weight_bytes'] / MIB:8.2f} {r['ratio']:6.3f} {r['linear_ratio']:6.3f} ")


def _times(r: dict) -> str:
    return f"{r['statement_seconds']:7.2f} {r['stage_seconds']:7.2f} {r['run_seconds']:6.1f}"


def table(model: str, rows: list[dict], ref: dict) -> str:
    if model == "decoder":
        head = (f"{'config':15} {'MiB':>8} {'ratio':>6} {'lin':>6} {'loss':>7} {'ppl':>7} {'ref ppl':>7} "
                f"{'dppl%':>7} {'stmt s':>7} {'stage s':>7} {'run s':>6}  note")
    else:
        head = (f"{'config':15} {'MiB':>8} {'ratio':>6} {'lin':>6} {'cos':>7} {'top1':>6} {'ref':>6} "
                f"{'loss':>7} {'stmt s':>7} {'stage s':>7} {'run s':>6}  note")
    lines = [f"{model}: reference {ref['note']} ({ref['seconds']:.1f} s)", head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['config']:15} {r['status']}: {r['note']}")
            continue
        e = r["eval"]
        if model == "decoder":
            a = e["against"]
            lines.append(f"{r['config']:15} " + _common(r) +
                         f"{e['loss']:7.4f} {e['perplexity']:7.3f} {a['perplexity']:7.3f} "
                         f"{100 * (e['perplexity'] / a['perplexity'] - 1):+7.2f} " + _times(r) + f"  {r['note']}")
        else:
            lines.append(f"{r['config']:15} " + _common(r) +
                         f"{e['similarity']:7.4f} {100 * e['accuracy']:5.1f}% {100 * e['against']['accuracy']:5.1f}% "
                         f"{e['loss']:7.4f} " + _times(r) + f"  {r['note']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compression.json")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "effc-bench-compression",
                    help="generated .eff files, run folders and logs (reused between invocations)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every effc run")
    ap.add_argument("--samples", type=int, default=256, help="decoder eval windows (stdlib.validation has 699)")
    ap.add_argument("--decoder-run", type=Path, help="a run folder whose 'pretrain' stage is reused (runs/quickstart)")
    ap.add_argument("--minilm", type=Path, help="an all-MiniLM-L6-v2 checkpoint folder [default: WORK/checkpoints]")
    ap.add_argument("--models", nargs="+", choices=["decoder", "encoder"], default=["decoder", "encoder"])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="configuration names (see CONFIGS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = args.work.resolve()
    ckpt = prepare(work, args.minilm, args.decoder_run is not None)
    specs = {
        "decoder": ("tiny", "stdlib", DECODER_HEAD,
                    f"eval tiny on stdlib.validation (metrics=[loss, perplexity], against=tiny@pretrain, "
                    f"samples={args.samples})", args.decoder_run),
        "encoder": ("m", "calib", ENCODER_HEAD.format(ckpt=ckpt),
                    "eval m on pairs.validation (metrics=[loss, similarity], against=m@base)", None),
    }
    out = {"benchmark": "bench/compression.py",
           "command": "python bench/compression.py " + " ".join(sys.argv[1:]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
                       "load_average_at_start": os.getloadavg()},
           "effc": effc.__version__, "threads": args.threads, "decoder_eval_samples": args.samples,
           "weight_bytes": "the cost table's 'bytes weights' of the model's IR after the statement "
                           "(effc.compiler.cost.estimate); linear_*: the linears of layers[*] alone",
           "models": {}}
    for model in args.models:
        m, calib, head, measure, seed_run = specs[model]
        ref = reference(work, model, head, args.threads, seed_run)
        rows = []
        for name, stmt in CONFIGS:
            if args.only and name not in args.only:
                continue
            r = configuration(work, model, name, stmt.format(m=m, calib=calib), head, measure, ref, args.threads)
            rows.append(r)
            print(f"  {model} {name}: {r['status']} {r['note']}", file=sys.stderr)
        out["models"][model] = {"reference": ref, "rows": rows}
        print(table(model, rows, ref) + "\n")
    out["total_seconds"] = time.perf_counter() - t0
    print("columns: MiB = weight bytes (cost table); ratio = of the dense fp32 model; lin = ratio for the linears of "
          "layers[*]; stmt s = the statement's metrics record; stage s = the compress stage (model build, "
          "calibration, rewrite, snapshot); run s = the whole effc run process")
    print(f"total {out['total_seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as e:
        sys.exit(f"error: {e}")
