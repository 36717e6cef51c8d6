"""Execution plans (compiler/plan.py, runtime/planned.py): overrides parse or are refused
with E0112; every field is realised and none changes what is computed beyond rounding
(checkpointing: bit for bit; accumulation and kernels: float32 rounding; bf16: the
autocast tolerance); the run and the build say which plan they used."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.plan import PlanError, apply, default_plan, overridden, parse_overrides
from effc.runtime.model import materialize
from effc.runtime.planned import forward_of, precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compiler"))
from conftest import model_info  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 8
LAYERS = 3
MODEL = f"decoder(vocab=13, dim=24, layers={LAYERS}, heads=4, ffn=20, seq=8)"
LORA = "    adapt m.layers[*].attn.{q,v} with lora(rank=2, alpha=4, dropout=0.1)\n"


def graph(body=LORA, kernels=None):
    info = model_info(MODEL, body)
    ir, _ = run_passes(lower_model(info), ["apply_lora", "assign_roles"], PassContext(tuple(info.adapters)))
    gm, _ = materialize(ir, SEQ, {}, 0, kernels=kernels)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in gm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return ir, gm


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 13, (n, SEQ), generator=g), torch.randint(0, 13, (n, SEQ), generator=g)


def grads(forward, gm, x, y, amp=None):
    torch.manual_seed(7)
    gm.zero_grad(set_to_none=True)
    gm.train()
    with amp or precision(None):
        loss = forward(x, y)
    loss.float().backward()
    return loss.detach().float(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- overrides


def test_overrides_set_each_field():
    p = default_plan(batch=16, accumulate=1, layers=LAYERS)
    assert p.micro_batch == 16 and p.checkpoint == ("none",) * LAYERS and p.kernels and not p.compile
    q = overridden(p, parse_overrides(["micro_batch=5", "checkpoint=full", "precision=bf16", "kernels=rotary,rms_norm",
                                       "compile=true"]))
    assert (q.accumulate, q.micro_batch) == (4, 4)  # ceil(16 / 5) micro-batches of at most 4
    assert q.checkpoint == ("full",) * LAYERS and q.precision == "bf16" and q.compile
    assert q.kernels == ("rms_norm", "rotary")  # in KERNELS order
    assert apply(p, "checkpoint", "attn,none,mlp").checkpoint == ("attn", "none", "mlp")
    assert "checkpoint attn,none,mlp," in apply(p, "checkpoint", "attn,none,mlp").describe()
    assert "checkpoint mlp on layers 0-1 of 3," in apply(p, "checkpoint", "mlp,mlp,none").describe()
    assert apply(p, "kernels", "none").kernels == ()
    assert "micro-batch 4 x 4, checkpoint full, bf16, kernels rms_norm,rotary, compile on" == q.describe()


def test_a_data_parallel_plan_splits_the_batch_between_processes():
    p = default_plan(batch=9, accumulate=2, layers=LAYERS, world=2)
    assert (p.per_process, p.accumulate, p.micro_batch) == (5, 2, 3)  # shares of 5 and 4, micro-batches of 3 and 2
    q = overridden(p, parse_overrides(["shard=zero3", "micro_batch=5"]))
    assert (q.accumulate, q.shard) == (1, "zero3")
    assert q.describe().endswith("2 processes, FSDP2 zero3") and "DDP" in p.describe()
    assert default_plan(batch=3, accumulate=8, layers=LAYERS, world=2).accumulate == 2  # no empty micro-batch


@pytest.mark.parametrize("item, words", [
    ("checkpoint=some", "unknown choice 'some'"),
    ("checkpoint=full,none", "2 entries for a model of 3 layers"),
    ("accumulate=0", "not a positive integer"),
    ("accumulate=17", "more micro-batches than the 16 sequences"),
    ("precision=fp8", "unknown precision"),
    ("kernels=rms,swiglu", "unknown kernel 'rms'"),
    ("compile=maybe", "not a boolean"),
    ("shard=zero1", "unknown choice"),
])
def test_bad_values_are_refused_with_a_hint(item, words):
    with pytest.raises(PlanError) as e:
        overridden(default_plan(16, 1, LAYERS), parse_overrides([item]))
    assert words in e.value.message and e.value.hint


@pytest.mark.parametrize("item", ["batch=3", "checkpointing=full", "full"])
def test_unknown_fields_are_refused(item):
    with pytest.raises(PlanError, match="no such plan field|expected key=value"):
        parse_overrides([item])


# ---------------------------------------------------------------- realised


@pytest.mark.parametrize("mode", ["full", "attn", "mlp", "full,none,attn"])
def test_checkpointing_recomputes_the_same_values(mode):
    """Same loss and gradients bit for bit (dropout included: the RNG state is restored
    for the recomputation), with the pieces sharing gm's parameters."""
    _, gm = graph()
    x, y = batch()
    l0, g0 = grads(gm, gm, x, y)
    plan = apply(default_plan(4, 1, LAYERS), "checkpoint", mode)
    run = forward_of(gm, plan)
    assert run is not gm and {id(p) for p in run.parameters()} <= {id(p) for p in gm.parameters()}
    l1, g1 = grads(run, gm, x, y)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k


def test_checkpointing_keeps_fewer_activations():
    """Saved-for-backward bytes of a forward: full checkpointing keeps the pieces' inputs
    only, less than half of what the plain graph keeps here."""
    _, gm = graph(body="")
    x, y = batch(8)

    def saved(forward):
        sizes = []

        def pack(t):
            sizes.append(t.untyped_storage().nbytes())
            return t

        gm.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(x, y)
        return sum(sizes)

    plain = saved(gm)
    full = saved(forward_of(gm, apply(default_plan(8, 1, LAYERS), "checkpoint", "full")))
    assert full < 0.5 * plain


def test_bf16_autocast_is_close_to_fp32():
    _, gm = graph()
    x, y = batch()
    l0, g0 = grads(gm, gm, x, y)
    plan = apply(default_plan(4, 1, LAYERS), "precision", "bf16")
    l1, g1 = grads(gm, gm, x, y, precision(plan))
    assert abs(float(l1) - float(l0)) <= 0.02 * abs(float(l0))  # bf16 keeps 8 bits of mantissa
    for k in g0:
        cos = torch.nn.functional.cosine_similarity(g0[k].flatten(), g1[k].flatten(), dim=0)
        assert cos > 0.99, k
        assert g1[k].dtype == torch.float32  # params and their gradients stay float32


# ---------------------------------------------------------------- end to end

PIPELINE = """pipeline planned
model m = decoder(vocab=16, dim=32, layers=2, heads=2, ffn=64, seq=16)
data d = markov(seq=16, vocab=16, seed=3)
stage pre:
    train m on d (steps=6, batch=4, optimizer=adamw(lr=1e-2))
stage tune:
    adapt m.layers[*].attn.{q,v} with lora(rank=2)
    train m on d (steps=6, batch=4, optimizer=adamw(lr=1e-2))
"""


def effc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "effc", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_effc_run_realises_and_reports_the_plan(tmp_path):
    """The same pipeline with the default plan and with accumulation, checkpointing and
    no kernels: the same loss curve to float32 rounding; the run says which plan it used."""
    (tmp_path / "p.eff").write_text(PIPELINE)
    a = effc("run", "p.eff", "-o", "a", "--threads", "1", "--plan", "kernels=all", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    b = effc("run", "p.eff", "-o", "b", "--threads", "1", "--plan", "accumulate=2", "--plan", "checkpoint=full",
             "--plan", "kernels=none", cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    assert "plan: micro-batch 4 x 1, checkpoint none, fp32, kernels all, compile off" in a.stdout + a.stderr
    assert "plan: micro-batch 2 x 2, checkpoint full, fp32, kernels none, compile off" in b.stdout + b.stderr
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == len(lb) == 12
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-4 * abs(x)
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    plans = [r for r in records if r["kind"] == "plan"]
    assert [r["stage"] for r in plans] == ["pre", "tune"]
    assert plans[-1]["plan"]["checkpoint"] == ["full", "full"] and plans[-1]["plan"]["accumulate"] == 2
    assert plans[0]["swaps"] == {}
    first = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "plan"]
    assert first[-1]["swaps"]["lora_linear"] == 4 and first[0]["swaps"]["linear_cross_entropy"] == 1


def test_the_run_executes_the_plan_its_build_chose_and_reports_the_prediction(tmp_path):
    """No field pinned: the build's searched plan is the one the run prints and records,
    with the predicted step time and peak beside the measured ones."""
    (tmp_path / "p.eff").write_text(PIPELINE.replace("pipeline planned", "pipeline planned\nbudget(memory=1GiB)"))
    assert effc("build", "p.eff", "-o", "b", cwd=tmp_path).returncode == 0
    chosen = [s["plan"] for s in json.loads((tmp_path / "b" / "build.json").read_text())["steps"]]
    r = effc("run", "p.eff", "-o", "r", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [x["plan"] for x in records if x["kind"] == "plan"] == chosen
    predictions = [x for x in records if x["kind"] == "prediction"]
    assert len(predictions) == 2
    for p in predictions:
        assert p["predicted_step_s"] > 0 and p["measured_step_s"] > 0 and p["profile"] == "built-in default"
        # the run measures the tensor-level peak of its second step: the cost model's yardstick
        assert p["peak_measure"] == "tensor-level, step 2"
        assert abs(p["predicted_peak"] / p["measured_peak"] - 1) < 0.10, p
    assert "a process (profile: built-in default)" in r.stdout + r.stderr


def test_bad_plan_on_the_command_line_is_a_diagnostic(tmp_path):
    (tmp_path / "p.eff").write_text(PIPELINE)
    r = effc("run", "p.eff", "--plan", "checkpoint=full,full,full", cwd=tmp_path)
    assert r.returncode == 1
    assert "<command line>:1:1: error[E0112]: --plan checkpoint=full,full,full: 3 entries for a model of 2 layers" \
        in r.stderr
    assert "Traceback" not in r.stderr
    r = effc("build", "p.eff", "--plan", "precison=bf16", cwd=tmp_path)
    assert r.returncode == 1 and "error[E0112]: --plan precison: no such plan field" in r.stderr


def test_build_stores_the_plan_and_show_lists_the_swaps(tmp_path):
    (tmp_path / "p.eff").write_text(PIPELINE)
    r = effc("build", "p.eff", "-o", "b", "--plan", "checkpoint=attn", "--plan", "kernels=all", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    steps = json.loads((tmp_path / "b" / "build.json").read_text())["steps"]
    assert [s["plan"]["checkpoint"] for s in steps] == [["attn", "attn"]] * 2
    assert effc("build", "p.eff", "-o", "d", cwd=tmp_path).returncode == 0
    plain = json.loads((tmp_path / "d" / "build.json").read_text())["steps"]
    for a, b in zip(steps, plain):  # the cost table is the plan's: checkpointing keeps less
        assert a["cost"]["activation_bytes"] < b["cost"]["activation_bytes"]
    tune = steps[1]["swaps"]
    assert sum(s["kernel"] == "lora_linear" for s in tune) == 4
    assert all(s["source"].startswith("p.eff:") for s in tune)
    shown = effc("show", "b", "--kernels", "--plan", cwd=tmp_path)
    assert shown.returncode == 0
    assert "micro-batch 4 x 1, checkpoint attn, fp32, kernels all, compile off" in shown.stdout
    assert "lora_linear" in shown.stdout and "p.eff:7:5" in shown.stdout  # the adapt line
    fx = effc("show", "b", "--fx", cwd=tmp_path).stdout
    assert "effc_kernels_lora_lora_linear" in fx and "effc_kernels_rmsnorm_rms_norm" in fx


def test_compile_runs_the_same_step():
    """compile=true: the forward goes through torch.compile (inductor, ~30 s to compile on
    this CPU, the one compile in the tests); effc's custom ops run inside the compiled
    graph, and the loss and gradients agree with eager to float32 rounding."""
    _, gm = graph(body="    adapt m.layers[*].attn.{q,v} with lora(rank=2, alpha=4)\n")
    x, y = batch()
    l0, g0 = grads(gm, gm, x, y)
    run = forward_of(gm, apply(default_plan(4, 1, LAYERS), "compile", "true"))
    assert run is not gm
    l1, g1 = grads(run, gm, x, y)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6 * float(g0[k].abs().max()) + 1e-9)


def test_what_the_machine_cannot_do_is_said_before_training(monkeypatch):
    """compile without a C++ compiler is an error with a hint; bf16 on a CPU without bf16
    matmul instructions is a note (it runs, slowly)."""
    import shutil

    from effc.runtime import planned

    plan = overridden(default_plan(4, 1, LAYERS), parse_overrides(["compile=true", "precision=bf16"]))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    errors, notes = planned.problems(plan)
    assert errors == [("--plan compile=true: torch.compile needs a C++ compiler on CPU, and none is on the PATH",
                       "install one (apt-get install g++), or leave compile off")]
    assert len(notes) == 1 and "no bf16 matmul instructions" in notes[0]
    assert planned.problems(default_plan(4, 1, LAYERS)) == ([], [])
    # FSDP2 (sharding over processes, or offload) does not go under torch.compile
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    sharded = overridden(default_plan(4, 1, LAYERS, world=2), parse_overrides(["shard=zero3", "compile=true"]))
    assert planned.problems(sharded)[0] == [
        ("--plan shard=zero3 with compile=true: FSDP2 under torch.compile is not supported yet",
         "leave compile off, or use shard=none (DDP) with compile")]
    offload = overridden(default_plan(4, 1, LAYERS), parse_overrides(["offload=true", "compile=true"]))
    errors, notes = planned.problems(offload)
    assert errors == [("--plan offload=true with compile=true: FSDP2 under torch.compile is not supported yet",
                       "leave compile off")]
    assert notes == ["offload=true on the CPU: the tensors are in host memory already, so it saves nothing "
                     "(FSDP2's offload path runs as it would beside a GPU)"]
    assert planned.problems(overridden(default_plan(4, 2, LAYERS, world=2), parse_overrides(["compile=true"]))) \
        == ([], [])  # DDP compiles


@pytest.mark.parametrize("kernels", ["costed", "all"])
@pytest.mark.parametrize("mode", ["none", "full", "attn", "mlp", "full,none,mlp"])
@pytest.mark.parametrize("body", ["", LORA.replace(", dropout=0.1", "")])
def test_the_cost_model_counts_the_plans_activations(mode, body, kernels):
    """What a forward leaves saved for backward under each checkpointing choice, with the
    reference-equivalent kernels and with every kernel (the fused head + loss saves its
    input gradient, not the log-probabilities), measured at the tensor level
    (runtime/memory.py) against estimate(..., checkpoint=, kernels=): equal to within the
    token ids of full training (the measurement holds them as inputs); and the backward's
    live bytes stay under the estimate's bound."""
    from effc.compiler.cost import estimate
    from effc.compiler.swaps import COSTED, KERNELS
    from effc.runtime.memory import LiveBytes

    chosen = COSTED if kernels == "costed" else KERNELS
    ir, gm = graph(body, kernels=chosen)
    x, y = batch(6, seed=3)
    plan = apply(default_plan(6, 1, LAYERS), "checkpoint", mode)
    run = forward_of(gm, plan)
    gm.train()
    with LiveBytes() as live:
        for t in [*gm.parameters(), *gm.buffers(), x, y]:
            live.track(t)
        base = live.bytes
        loss = run(x, y)
        saved = live.bytes - base
        loss.backward()
        backward = live.peak - base
    c = estimate(ir, 6, SEQ, checkpoint=plan.checkpoint, kernels=None if kernels == "costed" else chosen)
    assert abs(c.activation_bytes - saved) <= 8 * x.numel() + 8  # token ids, and the scalar loss
    assert backward <= c.activation_bytes + c.grad_bytes + c.transient_bytes
    if mode != "none":
        assert c.activation_bytes < estimate(ir, 6, SEQ).activation_bytes
