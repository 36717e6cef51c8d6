"""The plan search (compiler/search.py) and the step-time model (compiler/timing.py).

References: an independent brute force over the plan fields (every combination costed
directly with `estimate` and `predict`), the roofline formula for the time model, and
the budget itself."""

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from effc.compiler.cost import MemoryModel, estimate
from effc.compiler.ir import Op
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.pipeline import PASSES, compile_checked, layer_count
from effc.compiler.plan import CHECKPOINT, KERNELS, default_plan
from effc.compiler.profile import DEFAULT_CPU, DeviceProfile
from effc.compiler.search import format_search, per_process, relevant_kernels, search
from effc.compiler.timing import MATMUL_EFFICIENCY, predict
from effc.lang.check import check_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import model_info  # noqa: E402

LORA = "    adapt m.layers[*].attn.{q,v} with lora(rank=4, alpha=8)\n"
SMALL = "decoder(vocab=96, dim=32, layers=2, heads=4, ffn=64, seq=16)"
WIDE = "decoder(vocab=256, dim=64, layers=3, heads=4, ffn=176, seq=32)"


def ir_of(decl, body=""):
    info = model_info(decl, body)
    ir, _ = run_passes(lower_model(info), PASSES, PassContext(tuple(info.adapters)))
    return ir


def brute_force(ir, base, seq, budget):
    """Every plan of the search's space, costed directly: (memory, seconds, plan)."""
    layers = len(base.checkpoint)
    layouts = [("none",) * layers] + [(m,) * k + ("none",) * (layers - k) for m in CHECKPOINT[1:]
                                      for k in range(1, layers + 1)]
    micro = sorted({math.ceil(base.batch / a) for a in range(1, base.batch + 1)})
    kernels = relevant_kernels(ir)
    out = []
    for m, layout, on in itertools.product(micro, layouts, itertools.product([True, False], repeat=len(kernels))):
        chosen = tuple(k for k in KERNELS if k not in kernels or on[kernels.index(k)])
        plan = replace(base, accumulate=math.ceil(base.batch / m), checkpoint=layout, kernels=chosen)
        c = estimate(ir, plan.micro_batch, seq, checkpoint=layout, kernels=chosen)
        out.append((c.peak_bytes, predict(ir, plan, seq, DEFAULT_CPU).seconds, plan))
    return out


CASES = [(SMALL, LORA, 8, 16, None), (SMALL, "", 8, 16, 0.6), (WIDE, LORA, 6, 32, 0.5), (WIDE, "", 4, 32, 0.8)]


@pytest.mark.parametrize("decl, body, batch, seq, squeeze", CASES)
def test_exhaustive_search_finds_the_brute_force_optimum(decl, body, batch, seq, squeeze):
    """`squeeze`: the budget as a fraction of the default plan's peak (None: no budget)."""
    ir = ir_of(decl, body)
    base = default_plan(batch, 1, layer_count(ir))
    budget = None if squeeze is None else int(squeeze * estimate(ir, batch, seq, kernels=base.kernels).peak_bytes)
    everything = brute_force(ir, base, seq, budget)
    fits = [(t, mem) for mem, t, _ in everything if budget is None or mem <= budget]
    found = search(ir, base, seq, DEFAULT_CPU, budget, method="exhaustive")
    assert found.space == len(everything) == found.evaluated
    assert len(found.ranked) == len(fits)
    assert min(c.time.seconds for c in found.ranked) == pytest.approx(min(fits)[0], rel=1e-12)
    best = found.best
    assert budget is None or best.memory <= budget
    assert best.time.seconds <= min(fits)[0] * 1.03 + 1e-12  # the tie rule's 3%


@pytest.mark.parametrize("decl, body, batch, seq, squeeze", CASES + [(WIDE, LORA, 12, 32, 0.35)])
def test_metropolis_finds_a_plan_within_five_percent_of_the_enumerated_best(decl, body, batch, seq, squeeze):
    ir = ir_of(decl, body)
    base = default_plan(batch, 1, layer_count(ir))
    budget = None if squeeze is None else int(squeeze * estimate(ir, batch, seq, kernels=base.kernels).peak_bytes)
    exhaustive = search(ir, base, seq, DEFAULT_CPU, budget, method="exhaustive")
    walked = search(ir, base, seq, DEFAULT_CPU, budget, method="Metropolis", iterations=400)
    assert walked.evaluated < exhaustive.space  # it sampled, rather than enumerated
    fastest = min(c.time.seconds for c in exhaustive.ranked)
    assert walked.best is not None and walked.best.fits
    assert walked.best.time.seconds <= 1.05 * fastest


def test_the_search_is_deterministic():
    ir = ir_of(WIDE, LORA)
    base = default_plan(12, 1, layer_count(ir))
    a = search(ir, base, 32, DEFAULT_CPU, 2**22, method="Metropolis", iterations=300)
    b = search(ir, base, 32, DEFAULT_CPU, 2**22, method="Metropolis", iterations=300)
    assert [c.plan for c in a.ranked] == [c.plan for c in b.ranked]


def test_tighter_budgets_choose_smaller_and_never_faster_plans():
    ir = ir_of(WIDE, "")
    base = default_plan(8, 1, layer_count(ir))
    free = search(ir, base, 32, DEFAULT_CPU, None, method="exhaustive")
    last_time, fitted = 0.0, 0
    for squeeze in (1.0, 0.8, 0.6, 0.45, 0.3):
        budget = int(squeeze * free.best.memory)
        best = search(ir, base, 32, DEFAULT_CPU, budget, method="exhaustive").best
        if best is None:  # tighter than any plan: so is every tighter budget
            break
        fitted += 1
        assert best.memory <= budget
        fastest = best.time.seconds / 1.03  # within the tie rule
        assert fastest >= last_time * 0.999
        last_time = fastest
    assert fitted >= 3


def test_pinned_fields_stay_as_given():
    ir = ir_of(SMALL, LORA)
    base = replace(default_plan(8, 2, layer_count(ir)), checkpoint=("full", "none"))
    found = search(ir, base, 16, DEFAULT_CPU, None, pinned={"checkpoint", "accumulate"})
    assert {c.plan.checkpoint for c in found.ranked} == {("full", "none")}
    assert {c.plan.accumulate for c in found.ranked} == {2}
    assert found.searched == ("kernels",)


def test_data_parallel_memory_per_process():
    ir = ir_of(WIDE, "")
    model = MemoryModel(ir, 32)
    c = model.cost(4)
    W, G, O = c.weight_bytes, c.grad_bytes, c.optimizer_bytes
    assert c.peak_bytes == W + O + max(c.forward_bytes, c.backward_bytes, G + 2 * max(
        p.numel * 4 for p in ir.params() if p.trainable and p.tied_to is None))
    plan = default_plan(8, 1, 3, world=2)
    ddp = per_process(model, c, plan)
    assert ddp == c.peak_bytes + G  # DDP's gradient buckets
    # FSDP2's groups, as the runtime shards: the embedding, each layer (two norms, q k v o,
    # gate up down), the final norm and the head; nothing is shared, so the root owns nothing
    d, f, v = 64, 176, 256
    layer = 4 * (2 * d + 4 * d * d + 3 * d * f)
    assert model.groups.root_w == 0 and model.groups.w == [4 * v * d, layer, layer, layer, 4 * (d + v * d)]
    assert sum(model.groups.g) == G
    zero2 = per_process(model, c, replace(plan, shard="zero2"))
    zero3 = per_process(model, c, replace(plan, shard="zero3"))
    shards = (W + O) // 2
    assert zero2 >= shards + W + c.forward_bytes  # every group gathered at the end of forward
    assert zero3 >= shards + max(model.groups.w) + c.forward_bytes
    assert zero3 < zero2 < ddp
    # a budget between zero3's peak and zero2's: the search must shard the weights too
    between = search(ir, plan, 32, DEFAULT_CPU, (zero3 + zero2) // 2,
                     pinned={"accumulate", "checkpoint", "kernels"})
    assert between.best is not None and between.best.plan.shard == "zero3", format_search(between)
    # offload: beside a GPU the shards, gradients' shards and AdamW state are in host memory
    offload = per_process(model, c, replace(plan, shard="zero3", offload=True), gpu=True)
    # zero3's peak less its shards, and less the gradients' shards where they had all been reduced
    assert zero3 - shards - G // 2 <= offload <= zero3 - shards
    assert per_process(model, c, replace(plan, shard="zero3", offload=True), gpu=False) == zero3  # the same memory
    # tied: the embedding's weight, read by the first piece and the last, belongs to the root
    tied = MemoryModel(ir_of(WIDE.replace("seq=32", "seq=32, tied=true")), 32)
    assert tied.groups.root_w == 4 * v * d and tied.groups.w == [0, layer, layer, layer, 4 * d]
    found = search(ir, plan, 32, DEFAULT_CPU, None)
    assert {c.plan.shard for c in found.ranked} == {"none", "zero2", "zero3"}
    assert all(c.plan.micro_batch <= 4 for c in found.ranked)  # a process's share of 8 is 4


# ---------------------------------------------------------------- the time model


def flat_profile(rate=1e10):
    """One matmul rate at every shape, no per-call overhead, unlimited bandwidth."""
    return DeviceProfile("flat", "cpu", 1, {"float32": [[64.0, 64.0, 64.0, rate]]}, 1e30,
                         {"aten_op": 0.0, "custom_op": 0.0})


@pytest.mark.parametrize("body", ["", LORA])
def test_matmul_time_is_the_roofline_of_every_linear(body):
    """Forward 2 t in out per linear; backward the input gradient when the input needs
    one and the weight gradient when the weight trains: at a flat rate, their sum over
    the rate (and the efficiency) is the predicted matmul time."""
    ir = ir_of(SMALL, body)
    rate, tokens = 1e10, 8 * 16
    plan = replace(default_plan(8, 1, 2), kernels=())
    needs = {}
    for n in ir.nodes():
        needs[n.id] = any(p.trainable for p in n.params) or any(needs[i] for i in ir.inputs(n.id))
    flops = 0
    for n in ir.nodes():
        if n.op is Op.LINEAR:
            w = n.attrs.in_features * n.attrs.out_features
            flops += 2 * tokens * w * (1 + needs[ir.inputs(n.id)[0]] + n.params[0].trainable)
    t = predict(ir, plan, 16, flat_profile(rate))
    assert dict(t.parts)["matmul"] == pytest.approx(flops / (rate * MATMUL_EFFICIENCY), rel=1e-9)


def test_recomputation_and_accumulation_cost_time():
    ir = ir_of(WIDE, LORA)
    base = default_plan(8, 1, 3)
    t0 = predict(ir, base, 32, DEFAULT_CPU)
    full = predict(ir, replace(base, checkpoint=("full",) * 3), 32, DEFAULT_CPU)
    forward_layers = dict(full.parts)["recompute"]
    assert full.seconds == pytest.approx(t0.seconds + forward_layers)
    assert 0 < forward_layers < t0.seconds / 2  # a forward of the layers: less than half a step
    acc = predict(ir, replace(base, accumulate=8), 32, DEFAULT_CPU)
    assert acc.seconds > t0.seconds  # smaller matmuls at lower rates, eight times the calls
    assert acc.tokens == t0.tokens == 8 * 32


# ---------------------------------------------------------------- through the compiler


SRC = """pipeline p
budget(memory={memory})
model m = {decl}
data d = markov(seq=16, vocab=96)
stage s:
{body}    train m on d (steps=1, batch=8{extra})
"""


def compiled(memory="1GiB", body=LORA, extra="", **kw):
    result = check_source(SRC.format(memory=memory, decl=SMALL, body=body, extra=extra))
    assert result.ok, result.diagnostics
    return compile_checked(result, **kw)


def test_no_plan_fits_is_a_diagnostic_at_the_budget_with_the_smallest_memory():
    c = compiled("64KiB", body="")
    (d,) = c.diagnostics
    b = c.builds[0]
    smallest = min(x.memory for x in b.search.ranked + b.search.over)
    assert d.code == "E0404" and d.span.line == 2
    assert f"needs at least {smallest / 2**20:.1f}MiB" in d.message and "64KiB" not in d.message
    assert "optimizer state" in d.hint or "weights" in d.hint or "gradients" in d.hint


def test_a_written_accumulate_is_pinned_and_a_default_one_is_searched():
    free = compiled().builds[0].search
    assert "accumulate" in free.searched
    pinned = compiled(extra=", accumulate=4").builds[0]
    assert "accumulate" not in pinned.search.searched and pinned.plan.accumulate == 4


def test_the_report_ranks_and_says_why_the_others_lost():
    b = compiled("512KiB").builds[0]
    text = format_search(b.search, "train m", top=3)
    lines = text.splitlines()
    assert lines[0] == "# train m" and "budget 512 KiB per process" in lines[1]
    assert [ln.split()[0] for ln in lines[3:6]] == ["1", "2", "3"]
    assert "over the budget" in text and "slower than those shown" in text


def test_effc_plan_prints_ranked_plans(tmp_path):
    (tmp_path / "p.eff").write_text(SRC.format(memory="2MiB", decl=SMALL, body=LORA, extra=""))
    cmd = [sys.executable, "-m", "effc", "plan", "p.eff", "--top", "2"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "profile: built-in default" in out.stdout and "  1  micro-batch" in out.stdout
    js = subprocess.run(cmd + ["--format", "json", "--memory", "1MiB"], cwd=tmp_path, capture_output=True, text=True)
    assert js.returncode == 0, js.stderr
    step = json.loads(js.stdout)["steps"][0]
    assert step["budget"] == 2**20 and all(r["memory"] <= 2**20 for r in step["ranked"])
    bad = subprocess.run(cmd + ["--memory", "1KiB"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1 and "E0404" in bad.stderr and "Traceback" not in bad.stderr


def test_offload_is_searched_beside_a_gpu_only_and_chosen_when_nothing_else_fits():
    ir = ir_of(WIDE, "")
    gpu = replace(DEFAULT_CPU, device="cuda")
    base = default_plan(4, 1, 3)
    pinned = {"accumulate", "checkpoint", "kernels"}
    assert "offload" not in search(ir, base, 32, DEFAULT_CPU, None, pinned).searched
    free = search(ir, base, 32, gpu, None, pinned)
    assert free.searched == ("offload",) and free.best.plan.offload is False  # offload only adds copies
    off = next(c for c in free.ranked if c.plan.offload)
    assert off.memory < free.best.memory and off.plan.fsdp == "zero3"
    assert dict(off.time.parts)["offload"] > 0
    tight = search(ir, base, 32, gpu, (off.memory + free.best.memory) // 2, pinned)
    assert tight.best.plan.offload and "offload to host" in tight.best.plan.describe()


def test_effc_plan_with_a_gpu_profile_chooses_offload_under_a_budget_only_it_meets(tmp_path):
    profile = {**DEFAULT_CPU.to_json(), "device": "cuda", "host": {"link": 2.5e10, "bandwidth": 2e10}}
    (tmp_path / "gpu.json").write_text(json.dumps(profile))
    (tmp_path / "p.eff").write_text(SRC.format(memory="1GiB", decl=WIDE, body="", extra=""))
    env = {**os.environ, "EFFC_PROFILE": str(tmp_path / "gpu.json")}
    cmd = [sys.executable, "-m", "effc", "plan", "p.eff", "--format", "json", "--top", "10000"]
    free = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert free.returncode == 0, free.stderr
    ranked = json.loads(free.stdout)["steps"][0]["ranked"]
    kept = min(r["memory"] for r in ranked if not r["plan"]["offload"])
    moved = min(r["memory"] for r in ranked if r["plan"]["offload"])
    assert moved < kept
    tight = subprocess.run(cmd + ["--memory", f"{(moved + kept) // 2}B"], cwd=tmp_path, capture_output=True,
                           text=True, env=env)
    assert tight.returncode == 0, tight.stderr
    step = json.loads(tight.stdout)["steps"][0]
    assert step["ranked"] and all(r["plan"]["offload"] for r in step["ranked"])
