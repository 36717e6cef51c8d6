"""Training speed and memory, effc against transformers + PEFT, side by side on one machine.

    python bench/train_speed.py [--steps 20] [--warmup 3] [--rounds 1] [--threads 2]
                                [--only w1 w1_bf16 w2] [--work DIR] [--out bench/results/train_speed.json]

W1: a Llama-shaped decoder (hidden 512, 8 layers, 8 heads, MLP 1376, vocabulary 8192),
batch 8 x sequence 256, fp32, LoRA rank 8 alpha 16 on q and v, AdamW (lr 1e-3). One
checkpoint (`effc init-checkpoint`, random weights, a BPE tokenizer) is written once and
loaded by both systems; the batches (the standard library's docstrings through that
tokenizer, effc's data order) and the LoRA initialisation (effc's, copied into PEFT's
A and B) are written once and read by both, so both train the same model on the same
tokens from the same start.
- transformers + PEFT: `LlamaForCausalLM.from_pretrained` (its default attention, no
  gradient checkpointing), `get_peft_model(LoraConfig(r=8, lora_alpha=16,
  target_modules=["q_proj", "v_proj"], lora_dropout=0))`, a plain loop: forward with
  labels, backward, AdamW step.
- effc: the file's IR lowered to an fx graph with the plan's kernel swaps, realised by
  effc.runtime.planned (checkpointing, autocast), the training loop's arithmetic
  (summed loss over the step's tokens, micro-batches, AdamW).
W1 bf16: the same under torch.autocast(bfloat16) on both sides.
W2: W1 with the base's linears and its head quantized to int4 (groups of 64; 32 for the
MLP's down projection, whose input width 1376 is not a multiple of 64) under the LoRA,
loaded packed (the float weights never exist in the process).

Each configuration runs in its own fresh process (`--worker`), the configurations
interleaved round by round, at a fixed thread count. A worker trains warm-up steps,
then `--steps` timed steps; tokens/s is batch x sequence over the median step time.
Memory: VmHWM of the worker process over the training steps (peak resident set,
/proc/self/status, reset after loading through /proc/self/clear_refs; "load" is the peak
of the loading before it), and the tensor-level peak of one more step under
effc.runtime.memory.LiveBytes (params, buffers and optimizer state included). The matmul
peak of the machine (a 2048^3 float32 matmul, and bf16) is measured in the same run, and
each system's achieved training FLOP/s (effc's cost model's training FLOPs of the step)
is printed as a fraction of it. The table is printed and saved as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DIM, LAYERS, HEADS, FFN, VOCAB, SEQ, BATCH, RANK, ALPHA, LR = 512, 8, 8, 1376, 8192, 256, 8, 8, 16, 1e-3
GROUP = 64
PROFILE = False  # --profile: each worker also profiles one step (written to the JSON and PROFILE.txt)

# (workload, system, plan overrides): the effc plans tried in each workload.
CONFIGS = {
    "w1": [("hf", None), ("effc", ()), ("effc", ("kernels=none",)), ("effc", ("compile=true",)),
           ("effc", ("checkpoint=mlp",)), ("effc", ("checkpoint=full",)), ("effc", ("checkpoint=full", "accumulate=2"))],
    "w1_bf16": [("hf", None), ("effc", ()), ("effc", ("checkpoint=full",))],
    "w2": [("effc", ()), ("effc", ("checkpoint=full",))],
}


def vmhwm() -> int:
    """Peak resident set of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_vmhwm() -> int:
    """The peak so far, then the peak reset to the current resident set (Linux >= 4.0:
    writing 5 to /proc/self/clear_refs), so that what follows -- training -- has its own
    peak, free of the loading's (a checkpoint read while the params are filled)."""
    before = vmhwm()
    Path("/proc/self/clear_refs").write_text("5")
    return before


# ---------------------------------------------------------------- preparation (own process)


def eff_source(ckpt: Path, quantized: bool, accumulate: int = 1, steps: int = 1) -> str:
    # 1376 (the MLP width, the down projection's input) is not a multiple of 64: groups of 32 there
    q = (f"    quantize m.layers[*].attn.** to int4(group={GROUP})\n"
         f"    quantize m.layers[*].mlp.{{gate,up}} to int4(group={GROUP})\n"
         f"    quantize m.layers[*].mlp.down to int4(group=32)\n"
         f"    quantize m.head to int4(group={GROUP})\n") if quantized else ""
    return (f'pipeline bench\nmodel m = hf("{ckpt}")\n'
            f'data d = stdlib_text(seq={SEQ}, tokenizer="{ckpt}")\n'
            f"stage s:\n{q}"
            f"    adapt m.layers[*].attn.{{q,v}} with lora(rank={RANK}, alpha={ALPHA})\n"
            f"    train m on d (steps={steps}, batch={BATCH}, accumulate={accumulate}, "
            f"optimizer=adamw(lr={LR}))\n")


def prepare(work: Path, steps: int) -> None:
    """The checkpoint, the batches, the LoRA start and W2's packed weights (each once)."""
    ckpt = work / "ckpt"
    if not (ckpt / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "effc", "init-checkpoint", str(ckpt), "--family", "llama",
                        "--vocab", str(VOCAB), "--dim", str(DIM), "--layers", str(LAYERS), "--heads", str(HEADS),
                        "--ffn", str(FFN), "--seq", str(SEQ)], check=True)
    total = steps + 2  # warm-up and timed steps, then the tensor-peak and the profiled step
    batches = work / "batches.safetensors"
    if batches.exists() and (work / "w2_state.safetensors").exists():
        from safetensors import safe_open

        with safe_open(str(batches), "pt") as f:
            if f.get_slice("x").get_shape()[0] >= total:
                return
    import torch
    from safetensors.torch import save_file

    from effc.compiler.pipeline import model_ir
    from effc.lang.check import check_source
    from effc.lang.hf import read_hf
    from effc.runtime import compress as C
    from effc.runtime import data as D
    from effc.runtime.hf import CheckpointReader
    from effc.runtime.model import materialize, state_of
    from effc.runtime.run import adapter_args

    r = check_source(eff_source(ckpt, False), str(work / "bench.eff"))
    assert r.ok, r.diagnostics
    data = D.load_data("stdlib_text", r.data["d"].args, work)
    xs, ys = [], []
    for s in range(total):
        x, y = D.gather(data.train, SEQ, D.batch_windows(data.train, SEQ, s, BATCH, 0))
        xs.append(x)
        ys.append(y)
    save_file({"x": torch.stack(xs).contiguous(), "y": torch.stack(ys).contiguous()}, str(work / "batches.safetensors"))
    step = r.stages[0].steps[-1]
    ir, _ = model_ir(r, "m", step.span)
    source = CheckpointReader(read_hf(str(ckpt), SEQ), ir)
    gm, _ = materialize(ir, SEQ, source, 0, adapter_args(r.models["m"], ir), kernels="none")
    state = state_of(gm, ir)
    save_file({k: v.contiguous() for k, v in state.items() if ".lora" in k}, str(work / "lora.safetensors"))
    # W2: the dense weights quantized once, written packed
    rq = check_source(eff_source(ckpt, True), str(work / "bench.eff"))
    assert rq.ok, rq.diagnostics
    packed = {k: v for k, v in state.items() if ".lora" not in k}
    for edit in rq.models["m"].edits:  # the layers' linears, then the head
        ir_before, _ = model_ir(rq, "m", edit.span)
        packed = C.quantize(edit, ir_before, packed, None).state
    save_file({k: v.contiguous() for k, v in packed.items()}, str(work / "w2_state.safetensors"))


# ---------------------------------------------------------------- workers (each in a fresh process)


def _batches(work: Path):
    from safetensors.torch import load_file

    b = load_file(str(work / "batches.safetensors"))
    return b["x"], b["y"]


def _loop(step_fn, xs, ys, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    times, losses = [], []
    reset_vmhwm()
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_fn(xs[s], ys[s])
        dt = time.perf_counter() - t0
        if s >= warmup:
            times.append(dt)
        losses.append(float(loss))
    return times, losses


def _tensor_peak(step_fn, x, y, held) -> int:
    """Peak live tensor bytes over one more step: the tensors held between steps (`held`:
    params, buffers, optimizer state) plus everything the step creates."""
    from effc.runtime.memory import LiveBytes

    with LiveBytes() as live:
        for t in held:
            live.track(t)
        live.reset_peak()
        step_fn(x, y)
    return live.peak


def _profile(step_fn, x, y) -> str:
    """Where one step's time goes: torch.profiler's operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_fn(x, y)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40)


def _held(module, opt) -> list:
    ts = list(module.parameters()) + list(module.buffers())
    for state in opt.state.values():
        ts += [v for v in state.values() if hasattr(v, "untyped_storage")]
    return ts


def worker_hf(work: Path, workload: str, warmup: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    bf16 = workload.endswith("bf16")
    model = LlamaForCausalLM.from_pretrained(str(work / "ckpt"), torch_dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"]))
    lora = load_file(str(work / "lora.safetensors"))
    with torch.no_grad():  # effc's start: A and B of every adapter
        for i in range(LAYERS):
            for ours, theirs in (("q", "q_proj"), ("v", "v_proj")):
                mod = model.base_model.model.model.layers[i].self_attn.__getattr__(theirs)
                mod.lora_A["default"].weight.copy_(lora[f"layers[{i}].attn.{ours}.lora0.A"])
                mod.lora_B["default"].weight.copy_(lora[f"layers[{i}].attn.{ours}.lora0.B"])
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    xs, ys = _batches(work)

    def step(x, y):
        # The mean cross-entropy of every position against its next token, as effc's loss:
        # transformers' own labels= path shifts and drops the last position's target.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    load = vmhwm()
    times, losses = _loop(step, xs, ys, warmup, steps)
    hwm = vmhwm()
    peak = _tensor_peak(step, xs[warmup + steps], ys[warmup + steps], _held(model, opt))
    prof = _profile(step, xs[warmup + steps + 1], ys[warmup + steps + 1]) if PROFILE else None
    return {"profile": prof, "times": times, "losses": losses, "vmhwm": hwm, "vmhwm_load": load, "tensor_peak": peak,
            "plan": "transformers + PEFT"}


def worker_effc(work: Path, workload: str, overrides: list[str], warmup: int, steps: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from effc.compiler.cost import estimate
    from effc.compiler.pipeline import layer_count, model_ir
    from effc.compiler.plan import default_plan, overridden, parse_overrides
    from effc.lang.check import check_source
    from effc.lang.hf import read_hf
    from effc.runtime.hf import CheckpointReader
    from effc.runtime.model import materialize, trainable
    from effc.runtime.planned import forward_of, precision
    from effc.runtime.run import adapter_args
    from effc.runtime.train import micro_sizes

    quantized = workload == "w2"
    r = check_source(eff_source(work / "ckpt", quantized), str(work / "bench.eff"))
    assert r.ok, r.diagnostics
    step_stmt = r.stages[0].steps[-1]
    ir, _ = model_ir(r, "m", step_stmt.span)
    plan = overridden(default_plan(BATCH, 1, layer_count(ir)),
                      parse_overrides(list(overrides) + (["precision=bf16"] if workload.endswith("bf16") else [])))
    lora = load_file(str(work / "lora.safetensors"))
    if quantized:
        base = load_file(str(work / "w2_state.safetensors"))
    else:
        base = CheckpointReader(read_hf(str(work / "ckpt"), SEQ), ir)
    from collections import ChainMap

    gm, _ = materialize(ir, SEQ, ChainMap(lora, base), 0, adapter_args(r.models["m"], ir), kernels=plan.kernels)
    del base
    forward = forward_of(gm, plan)
    named = trainable(gm, ir)
    opt = torch.optim.AdamW([p for _, p in named], lr=LR, foreach=False)  # effc's loop's optimizer
    sizes = micro_sizes(BATCH, plan.accumulate)
    xs, ys = _batches(work)
    gm.train()

    def step(x, y):
        count = int((y != -100).sum())
        total = 0.0
        for xm, ym in zip(x.split(sizes), y.split(sizes)):
            with precision(plan):
                part = forward(xm, ym)
            (part.float() / count).backward()
            total += part.detach().item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / count

    load = vmhwm()
    times, losses = _loop(step, xs, ys, warmup, steps)
    hwm = vmhwm()
    peak = _tensor_peak(step, xs[warmup + steps], ys[warmup + steps], _held(gm, opt))
    prof = _profile(step, xs[warmup + steps + 1], ys[warmup + steps + 1]) if PROFILE else None
    cost = estimate(ir, plan.micro_batch, SEQ)
    weights = cost.weight_bytes
    return {"profile": prof, "times": times, "losses": losses, "vmhwm": hwm, "vmhwm_load": load,
            "tensor_peak": peak, "plan": plan.describe(),
            "swaps": len(gm.meta["swaps"]), "flops_step": cost.flops_train_per_token * BATCH * SEQ,
            "weight_bytes": weights, "predicted_peak": cost.peak_bytes}


def matmul_peak(threads: int) -> dict:
    """FLOP/s of a 2048^3 matmul, float32 and bfloat16: the best of 10 after a warm-up
    (a peak; bf16 with fewer repeats when it is slow)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        t0 = time.perf_counter()
        a @ b
        first = time.perf_counter() - t0
        ts = [first]
        for _ in range(10 if first < 1 else 1):
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
        out[str(dtype).split(".")[1]] = 2 * 2048 ** 3 / min(ts)
    return out


# ---------------------------------------------------------------- the driver


def run_worker(args, workload: str, system: str, overrides) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--workload", workload, "--work", str(args.work),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)] + \
        (["--profile"] if args.profile else [])
    for o in overrides or ():
        cmd += ["--plan", o]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout)[-2000:], "seconds": time.perf_counter() - t0}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["seconds"] = time.perf_counter() - t0
    return res


def summarise(rows: list[dict], peak: dict) -> None:
    # transformers computes the same model: effc's cost model's FLOPs of the step count for it too
    flops = next((r["flops_step"] for r in rows if "flops_step" in r), None)
    for r in rows:
        if "error" not in r and "flops_step" not in r and flops is not None:
            r["flops_step"] = flops
        if "error" in r:
            continue
        r["step_s"] = statistics.median(r["times"])
        r["tokens_per_s"] = BATCH * SEQ / r["step_s"]
        r["loss_at_20"] = r["losses"][-1]
        if "flops_step" in r:
            r["flops_per_s"] = r["flops_step"] / r["step_s"]
            r["of_peak"] = r["flops_per_s"] / peak["bfloat16" if "bf16" in r["plan"] or "bf16" in r.get(
                "workload", "") else "float32"]


def table(workload: str, rows: list[dict]) -> str:
    hf = next((r for r in rows if r["system"] == "hf" and "error" not in r), None)
    head = (f"{'system':8} {'plan':74} {'tok/s':>7} {'x hf':>5} {'VmHWM MiB':>9} {'x hf':>5} {'load MiB':>8} "
            f"{'tensor MiB':>10} {'x hf':>5} {'loss@end':>9} {'of peak':>7}")
    lines = [f"{workload}: batch {BATCH} x seq {SEQ}, LoRA r{RANK} on q,v", head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['system']:8} {r.get('plan_overrides', '')!s:74} failed: {r['error'].splitlines()[-1]}")
            continue

        def ratio(key):
            return f"{r[key] / hf[key]:5.2f}" if hf else "    -"
        lines.append(f"{r['system']:8} {r['plan'][:74]:74} {r['tokens_per_s']:7.0f} {ratio('tokens_per_s')} "
                     f"{r['vmhwm'] / 2**20:9.0f} {ratio('vmhwm')} {r['vmhwm_load'] / 2**20:8.0f} "
                     f"{r['tensor_peak'] / 2**20:10.0f} "
                     f"{ratio('tensor_peak')} {r['loss_at_20']:9.4f} "
                     + (f"{100 * r['of_peak']:6.1f}%" if 'of_peak' in r else "      -"))
    return "\n".join(lines)


def verdict(workload: str, rows: list[dict]) -> list[str]:
    ok = [r for r in rows if "error" not in r]
    hf = next((r for r in ok if r["system"] == "hf"), None)
    effc = [r for r in ok if r["system"] == "effc"]
    if not effc:
        return []
    out = []
    if hf:
        fastest = max(effc, key=lambda r: r["tokens_per_s"])
        matching = [r for r in effc if r["tokens_per_s"] >= hf["tokens_per_s"]]
        lean = min(matching, key=lambda r: r["vmhwm"]) if matching else None
        out.append(f"{workload}: fastest effc plan [{fastest['plan']}] {fastest['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
                   f"the tokens/s of transformers + PEFT (target >= 1.2x)")
        if lean:
            out.append(f"{workload}: leanest effc plan at >= transformers' tokens/s [{lean['plan']}]: VmHWM "
                       f"{lean['vmhwm'] / hf['vmhwm']:.2f}x, tensor peak {lean['tensor_peak'] / hf['tensor_peak']:.2f}x "
                       f"(target <= 0.6x VmHWM)")
        else:
            leanest = min(effc, key=lambda r: r["vmhwm"])
            out.append(f"{workload}: no effc plan reached transformers' tokens/s; the leanest [{leanest['plan']}] is "
                       f"at VmHWM {leanest['vmhwm'] / hf['vmhwm']:.2f}x")
        d = max(abs(r["loss_at_20"] - hf["loss_at_20"]) / abs(hf["loss_at_20"]) for r in effc)
        out.append(f"{workload}: loss after the last step, largest relative difference to transformers + PEFT "
                   f"{100 * d:.3f}% (target <= 1%)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "effc-bench-train-speed")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_speed.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="repeat every configuration, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    ap.add_argument("--force-bf16", action="store_true", help="run w1_bf16 even where bf16 matmuls are emulated")
    ap.add_argument("--profile", action="store_true", help="profile one more step in every worker (torch.profiler)")
    ap.add_argument("--from-json", type=Path, help="print the table of an earlier run's JSON again (and update it)")
    ap.add_argument("--worker", choices=["hf", "effc"], help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--plan", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()

    global PROFILE
    PROFILE = args.profile
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        res = worker_hf(args.work, args.workload, args.warmup, args.steps) if args.worker == "hf" else \
            worker_effc(args.work, args.workload, args.plan, args.warmup, args.steps)
        print(json.dumps(res))
        return

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        peak = saved["matmul_peak_flops"]
        rows_by = saved["results"]
        for rows in rows_by.values():
            summarise(rows, peak)
        skipped = [line for line in saved["table"].splitlines() if "skipped" in line]
        if "seconds" not in saved:  # written before the field existed: the table's last line has it
            saved["seconds"] = float(saved["table"].rsplit("total ", 1)[1].split(" s")[0])
        text = "\n".join(report(rows_by, peak, skipped, saved["threads"], saved["seconds"]))
        print(text)
        saved["table"] = text
        args.from_json.write_text(json.dumps(saved, indent=1))
        return

    t_start, load_start = time.perf_counter(), list(os.getloadavg())
    args.work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['x']; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                    f"import train_speed as T; from pathlib import Path; T.prepare(Path({str(args.work)!r}), "
                    f"{args.steps + args.warmup})"], check=True)
    peak = matmul_peak(args.threads)
    skipped = []
    if "w1_bf16" in args.only and peak["bfloat16"] < 0.25 * peak["float32"] and not args.force_bf16:
        # no bf16 matmul units (AVX-512 BF16, AMX): both systems would crawl at the same emulated speed
        args.only = [w for w in args.only if w != "w1_bf16"]
        skipped.append(f"w1_bf16 skipped: this CPU's bf16 matmul runs at {peak['bfloat16'] / 1e9:.1f} GFLOP/s against "
                       f"{peak['float32'] / 1e9:.1f} in float32 (no bf16 units); --force-bf16 runs it anyway")
    results = {w: [] for w in args.only}
    for rnd in range(args.rounds):
        for w in args.only:
            for system, overrides in CONFIGS[w]:
                print(f"round {rnd + 1}: {w} {system} {' '.join(overrides or ())}", flush=True)
                res = run_worker(args, w, system, overrides)
                res.update(system=system, plan_overrides=list(overrides or ()), round=rnd)
                results[w].append(res)
    rows_by = merge_rounds(results, peak)
    lines = report(rows_by, peak, skipped, args.threads, time.perf_counter() - t_start)
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "bench/train_speed.py", "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": load_start},
        "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "matmul_peak_flops": peak, "table": text, "seconds": time.perf_counter() - t_start,
        "results": {w: [{k: v for k, v in r.items()} for r in rows] for w, rows in rows_by.items()},
    }, indent=1))
    print(f"wrote {args.out}")
    profiles = [f"## {w}: {r['system']} [{r.get('plan', '')}]\n{r['profile']}" for w, rows in rows_by.items()
                for r in rows if r.get("profile")]
    if profiles:
        path = args.out.with_suffix(".profile.txt")
        path.write_text("\n\n".join(profiles))
        print(f"wrote {path}")


def merge_rounds(results: dict, peak: dict) -> dict:
    """Rounds merged per configuration: every timed step of every round, the largest
    peaks."""
    rows_by = {}
    for w, rows in results.items():
        merged = {}
        for r in rows:
            key = (r["system"], tuple(r["plan_overrides"]))
            if "error" in r:
                merged.setdefault(key, r)
                continue
            m = merged.setdefault(key, {**r, "times": []})
            if "error" in m:
                continue
            m["times"] = m["times"] + r["times"]
            m["vmhwm"] = max(m["vmhwm"], r["vmhwm"])
            m["tensor_peak"] = max(m["tensor_peak"], r["tensor_peak"])
        rows_by[w] = list(merged.values())
        summarise(rows_by[w], peak)
    return rows_by


def report(rows_by: dict, peak: dict, skipped: list[str], threads: int, seconds: float) -> list[str]:
    lines = []
    for w, rows in rows_by.items():
        lines.append(table(w, rows))
        lines += verdict(w, rows)
        lines.append("")
    if "w1" in rows_by and "w2" in rows_by:
        lines += w2_report(rows_by["w1"], rows_by["w2"])
    lines += skipped
    lines.append(f"matmul peak (2048^3): float32 {peak['float32'] / 1e9:.1f} GFLOP/s, bfloat16 "
                 f"{peak['bfloat16'] / 1e9:.1f} GFLOP/s; {threads} threads; total {seconds:.0f} s")
    return lines


def w2_report(w1: list[dict], w2: list[dict]) -> list[str]:
    """W2 against W1 under the same plan: base weight bytes, and the drop in VmHWM against
    the weight bytes the cost table says int4 saves."""
    out = []
    for r2 in w2:
        if "error" in r2:
            continue
        r1 = next((r for r in w1 if r["system"] == "effc" and r["plan_overrides"] == r2["plan_overrides"]
                   and "error" not in r), None)
        if r1 is None:
            continue
        saved = r1["weight_bytes"] - r2["weight_bytes"]
        drop = r1["vmhwm"] - r2["vmhwm"]
        tdrop = r1["tensor_peak"] - r2["tensor_peak"]
        out.append(f"w2 [{r2['plan']}]: weight bytes {r2['weight_bytes'] / 2**20:.1f} MiB vs "
                   f"{r1['weight_bytes'] / 2**20:.1f} MiB fp32 ({r2['weight_bytes'] / r1['weight_bytes']:.3f}x, "
                   f"target <= 0.3x); predicted saving {saved / 2**20:.1f} MiB; VmHWM drop {drop / 2**20:.1f} MiB "
                   f"({drop / saved:.2f}x of predicted, target 0.9-1.1x); tensor-peak drop {tdrop / 2**20:.1f} MiB "
                   f"({tdrop / saved:.2f}x); tokens/s {r2['tokens_per_s']:.0f} vs {r1['tokens_per_s']:.0f} fp32")
    return out


if __name__ == "__main__":
    main()
