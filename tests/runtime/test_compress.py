"""The compression statements at run time, each against an independent reference:

- a recursive model equals an unrolled model holding copies of the same blocks (outputs),
  and a shared weight's gradient is the sum of the unrolled copies' gradients;
- each init rule (average, stepwise, lower) is the formula of Bae et al. 2024;
- per-loop LoRA at full rank reproduces every original layer (truncated SVD of the
  difference to its block);
- pruned weights keep their zeros through training, and a merge into them masks the
  update, reporting the masked norm by its formula;
- a quantized linear computes x @ dequant(W).T, and LoRA trains on top of it;
- distillation's loss is torch's KL divergence at temperature t, times t².
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from effc.compiler.pipeline import model_ir
from effc.kernels import quant as Q
from effc.lang.check import check_source
from effc.runtime import compress as C
from effc.runtime import distill
from effc.runtime.distill import KERNELS as DISTILL_KERNELS
from effc.runtime.model import dense_ir, dense_state, materialize, merged_state, state_of
from effc.runtime.run import adapter_args
from effc.runtime.train import Hooks, TrainSpec, train

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 16
MODEL = "model m = decoder(vocab=64, dim=32, layers=4, heads=4, ffn=64, seq=16)\n"


def program(body: str):
    src = f"pipeline t\n{MODEL}data d = markov(seq={SEQ}, vocab=64)\nstage s:\n{body}    train m on d (steps=1, batch=2)\n"
    r = check_source(src)
    assert r.ok, r.diagnostics
    return r


def steps(r):
    return r.stages[0].steps


def fresh_state(r, until, seed=1):
    ir, _ = model_ir(r, "m", until)
    gm, _ = materialize(ir, SEQ, {}, seed)
    return state_of(gm, ir)


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 64, (3, SEQ), generator=g)
    return x, torch.roll(x, -1, 1)


def test_recursive_model_equals_unrolled_copies_and_shared_grads_sum():
    r = program("    share m.layers[0:4] as recursive(blocks=2, init=average)\n")
    share, tr = steps(r)
    plain_ir, _ = model_ir(r, "m", share.span)
    shared_ir, _ = model_ir(r, "m", tr.span)
    out = C.share(share.edit, fresh_state(r, share.span))
    unrolled = dict(out.state)
    for i in (2, 3):
        for k, v in out.state.items():
            if k.startswith(f"layers[{i - 2}]."):
                unrolled[f"layers[{i}]." + k.split(".", 1)[1]] = v.clone()
    a, _ = materialize(shared_ir, SEQ, out.state, 0)
    b, fresh = materialize(plain_ir, SEQ, unrolled, 0)
    assert fresh == []
    x, y = tokens()
    la, lb = a(x, y), b(x, y)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-5)
    la.backward(), lb.backward()
    for leaf in ("attn.q.weight", "mlp.down.weight", "mlp_norm.weight"):
        ga = a.get_parameter(f"layers.0.{leaf}").grad
        gb = b.get_parameter(f"layers.0.{leaf}").grad + b.get_parameter(f"layers.2.{leaf}").grad
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("init", ["average", "stepwise", "lower"])
def test_block_init_rules(init):
    r = program(f"    share m.layers[0:4] as recursive(blocks=2, init={init})\n")
    share = steps(r)[0]
    state = fresh_state(r, share.span)
    out = C.share(share.edit, state).state
    w = lambda s, i: s[f"layers[{i}].attn.o.weight"]  # noqa: E731
    # N=4 layers, K=2 blocks, 2 loops; block b serves layers b and b+2
    expect = {"average": [(w(state, 0) + w(state, 2)) / 2, (w(state, 1) + w(state, 3)) / 2],
              "stepwise": [w(state, 0), w(state, 2)],  # every (N/K)-th layer
              "lower": [w(state, 0), w(state, 1)]}[init]
    for b in range(2):
        torch.testing.assert_close(w(out, b), expect[b], rtol=0, atol=1e-7)
    assert not any(k.startswith(("layers[2].", "layers[3].")) for k in out)


def test_per_loop_lora_at_full_rank_reproduces_the_original_layers():
    r = program("    share m.layers[0:4] as recursive(blocks=2)\n"
                "    adapt m.layers[*].attn.{q,v} with lora(rank=32, alpha=32, per_loop=true)\n")
    share, tr = steps(r)
    original = fresh_state(r, share.span)
    out = C.share(share.edit, original)
    ir, _ = model_ir(r, "m", tr.span)
    args = {id: {**a, "residual": out.residuals[ir.node(id).attrs.target]}
            for id, a in adapter_args(r.models["m"], ir).items()}
    gm, fresh = materialize(ir, SEQ, out.state, 0, args)
    assert len(fresh) == 16  # A and B of 8 per-loop adapters
    merged = merged_state(dense_ir(ir), dense_state(ir, state_of(gm, ir)))
    for i in range(4):
        for lin in ("q", "v"):
            key = f"layers[{i}].attn.{lin}.weight"
            # fp32 round-off of an SVD of a 32 x 32 difference, rebuilt in float64 and cast
            torch.testing.assert_close(merged[key], original[key], rtol=0, atol=2e-6)


def test_pruned_weights_keep_their_zeros_through_training(tmp_path):
    from effc.runtime.data import load_data
    r = program("    prune m.layers[*].mlp.** with magnitude(sparsity=0.5)\n")
    prune, tr = steps(r)
    ir0, _ = model_ir(r, "m", prune.span)
    state = fresh_state(r, prune.span)
    done = C.prune(prune.edit, ir0, state, None)
    w = done.state["layers[0].mlp.up.weight"]
    zeros = w == 0
    assert int(zeros.sum()) == w.numel() // 2
    # the kept half is the larger half by magnitude
    assert state["layers[0].mlp.up.weight"].abs()[zeros].max() <= state["layers[0].mlp.up.weight"].abs()[~zeros].min()
    ir, _ = model_ir(r, "m", tr.span)
    assert ir.node("layers[0].mlp.up").params[0].trainable
    gm, _ = materialize(ir, SEQ, done.state, 0)
    data = load_data("markov", r.data["d"].args, tmp_path)
    spec = dataclasses.replace(TrainSpec.from_options(tr.options), steps=3, lr=1e-2)
    train(gm, ir, data, spec, tmp_path / "ckpt", False, Hooks())
    after = state_of(gm, ir)
    assert torch.equal(after["layers[0].mlp.up.weight"] == 0, zeros)
    assert not torch.equal(after["layers[0].mlp.up.weight"], w)  # the kept weights did train


def test_merging_into_a_pruned_weight_keeps_its_zeros_and_reports_the_masked_norm():
    r = program("    prune m.layers[*].mlp.** with nm(n=2, m=4)\n"
                "    adapt m.layers[*].mlp.up with lora(rank=2)\n")
    prune, tr = steps(r)
    ir0, _ = model_ir(r, "m", prune.span)
    pruned = C.prune(prune.edit, ir0, fresh_state(r, prune.span), None).state
    ir, _ = model_ir(r, "m", tr.span)
    gm, _ = materialize(ir, SEQ, pruned, 0)
    state = state_of(gm, ir)
    state["layers[0].mlp.up.lora0.B"] = torch.randn(64, 2)  # a trained, nonzero update
    dropped = {}
    merged = merged_state(ir, state, dropped)
    w = pruned["layers[0].mlp.up.weight"]
    keep = w != 0
    delta = ir.node("layers[0].mlp.up.lora0").attrs.scale * (state["layers[0].mlp.up.lora0.B"].double()
                                                             @ state["layers[0].mlp.up.lora0.A"].double())
    torch.testing.assert_close(merged["layers[0].mlp.up.weight"], (w + delta * keep).float())
    assert torch.equal(merged["layers[0].mlp.up.weight"] == 0, ~keep)
    expect = float((delta * ~keep).norm() / delta.norm())
    assert dropped["layers[0].mlp.up.weight"] == pytest.approx(expect, rel=1e-6)  # the update is formed in fp32


@pytest.mark.parametrize("scheme", ["int8()", "int4(group=32)", "nf4(group=32)", "nf4(group=32, double_quant=false)"])
def test_quantized_graph_computes_with_the_dequantized_weights_and_lora_trains_on_top(scheme):
    r = program(f"    quantize m.layers[*].**:linear to {scheme}\n"
                "    adapt m.layers[*].attn.{q,v} with lora(rank=2)\n")
    quant, tr = steps(r)
    ir0, _ = model_ir(r, "m", quant.span)
    done = C.quantize(quant.edit, ir0, fresh_state(r, quant.span), None)
    ir, _ = model_ir(r, "m", tr.span)
    gm, _ = materialize(ir, SEQ, done.state, 0)
    state = state_of(gm, ir)
    state["layers[1].attn.q.lora0.B"] = torch.randn(32, 2) * 0.1
    # reference: the dense model with the dequantized weights and the same adapters
    ref, _ = materialize(dense_ir(ir), SEQ, dense_state(ir, state), 0)
    gm, _ = materialize(ir, SEQ, state, 0)
    x, y = tokens()
    loss, want = gm(x, y), ref(x, y)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)
    loss.backward(), want.backward()
    torch.testing.assert_close(gm.get_parameter("layers.1.attn.q.lora0.A").grad,
                               ref.get_parameter("layers.1.attn.q.lora0.A").grad, rtol=1e-4, atol=1e-6)
    assert gm.get_parameter("layers.0.attn.q.qweight").grad is None
    # the bytes held at the tensor level are what the cost table counts
    from effc.compiler.cost import estimate
    held = sum(t.numel() * t.element_size() for t in state_of(gm, ir).values())
    assert held == estimate(ir, 2, SEQ).weight_bytes


def test_distillation_loss_is_the_tempered_kl_divergence():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, :2] = -100
    keep = y != -100
    temp = 2.0
    ref = F.kl_div(F.log_softmax(s[keep] / temp, -1), F.log_softmax(t[keep] / temp, -1), log_target=True,
                   reduction="sum") * temp ** 2
    torch.testing.assert_close(distill.kl_sum(s, t, y, temp), ref)


def test_distilled_graph_trains_on_the_teacher_and_evaluates_cross_entropy():
    r = program("")
    tr = steps(r)[0]
    ir, _ = model_ir(r, "m", tr.span)
    fused, _ = materialize(ir, SEQ, {}, 1)
    with pytest.raises(ValueError, match="fused head and loss"):  # distillation needs the logits
        distill.attach(fused, fused, 2.0)
    student, _ = materialize(ir, SEQ, {}, 1, kernels=DISTILL_KERNELS)
    plain = student.graph.python_code("self").src
    teacher, _ = materialize(ir, SEQ, {}, 2, output="logits")
    x, y = tokens()
    ce = student(x, y)
    distill.attach(student, teacher, 2.0)
    assert student.graph.python_code("self").src != plain
    student.train()
    got = student(x, y)
    with torch.no_grad():
        s_logits = materialize(ir, SEQ, state_of(student, ir), 0, output="logits")[0](x)
    torch.testing.assert_close(got, distill.kl_sum(s_logits, teacher(x), y, 2.0), rtol=1e-5, atol=1e-5)
    student.eval()
    torch.testing.assert_close(student(x, y), ce)
    got.backward()
    assert student.get_parameter("layers.0.attn.q.weight").grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_quantize_roundtrip_reference_is_the_kernel_dequantizer():
    w = torch.randn(8, 64)
    packed = Q.quantize_int4_rtn(w, 32)
    assert torch.equal(Q.dequantize("int4", packed, 32),
                       Q.dequantize_int4(packed["qweight"], packed["scale"], packed["zero"], 32))


@pytest.mark.parametrize("body,drop", [
    ("    prune m.layers[*].attn with heads(fraction=0.25)\n", "heads"),
    ("    prune m.layers[*].mlp with channels(fraction=0.5)\n", "channels"),
])
def test_structured_pruning_equals_zeroing_the_removed_units(body, drop):
    """The shrunk model computes what the full model computes with the removed heads'
    o-columns (channels' down-columns) zeroed: those units then write nothing."""
    r = program(body)
    prune, tr = steps(r)
    before, _ = model_ir(r, "m", prune.span)
    after, _ = model_ir(r, "m", tr.span)
    state = fresh_state(r, prune.span)
    done = C.prune(prune.edit, before, state, None)
    small, fresh = materialize(after, SEQ, done.state, 0)
    assert fresh == []
    zeroed = dict(state)
    for i in range(4):
        leaf = f"layers[{i}].attn.o.weight" if drop == "heads" else f"layers[{i}].mlp.down.weight"
        full, kept = state[leaf], done.state[leaf]
        cols = [c for c in range(full.shape[1]) if not any(torch.equal(full[:, c], kept[:, j])
                                                            for j in range(kept.shape[1]))]
        assert len(cols) == full.shape[1] - kept.shape[1]
        zeroed[leaf] = full.clone()
        zeroed[leaf][:, cols] = 0
    big, _ = materialize(before, SEQ, zeroed, 0)
    x, y = tokens()
    torch.testing.assert_close(small(x, y), big(x, y), rtol=1e-5, atol=1e-5)
    from effc.compiler.cost import estimate
    held = sum(t.numel() for t in done.state.values())
    assert held == estimate(after, 2, SEQ).params_total < estimate(before, 2, SEQ).params_total


def test_dropped_sublayers_equal_zeroed_branches_and_are_the_most_similar(tmp_path):
    from effc.runtime.data import load_data
    r = program("    prune m.layers[*] with drop_sublayers(kind=attn, count=2, calibrate=d, samples=4)\n")
    drop, tr = steps(r)
    before, _ = model_ir(r, "m", drop.span)
    state = fresh_state(r, drop.span)
    gm, _ = materialize(before, SEQ, state, 0)
    data = load_data("markov", r.data["d"].args, tmp_path)
    sims = C.sublayer_similarity(gm, before, list(drop.edit.paths), "attn", data.train, SEQ, 4)
    done = C.drop_sublayers(drop.edit, state, sims)
    dropped = drop.edit.args["dropped"]
    assert len(dropped) == 2 and sorted(sims, key=sims.get)[-2:] == sorted(dropped, key=sims.get)
    after, _ = model_ir(r, "m", tr.span)  # reads the choice
    assert all(f"{layer}.attn.q" not in after and f"{layer}.attn_norm" not in after for layer in dropped)
    small, fresh = materialize(after, SEQ, done.state, 0)
    assert fresh == []
    zeroed = dict(state)
    for layer in dropped:  # a branch that adds zero leaves the stream as it was
        zeroed[f"{layer}.attn.o.weight"] = torch.zeros_like(state[f"{layer}.attn.o.weight"])
    big, _ = materialize(before, SEQ, zeroed, 0)
    x, y = tokens()
    torch.testing.assert_close(small(x, y), big(x, y), rtol=1e-6, atol=1e-5)


def test_tie_makes_a_module_read_another_ones_params():
    r = program("    tie m.layers[3].mlp with m.layers[1].mlp\n    tie m.layers[2].attn.q with m.layers[0].attn.q\n")
    t1, t2, tr = steps(r)
    before, _ = model_ir(r, "m", t1.span)
    after, _ = model_ir(r, "m", tr.span)
    p = {q.path: q for q in after.params()}
    assert p["layers[3].mlp.down.weight"].tied_to == "layers[1].mlp.down.weight"
    assert p["layers[2].attn.q.weight"].tied_to == "layers[0].attn.q.weight"
    assert p["layers[2].attn.k.weight"].tied_to is None
    state = fresh_state(r, t1.span)
    out = C.tie(t2.edit, C.tie(t1.edit, state).state).state
    copies = dict(out)
    for k, v in out.items():
        if k.startswith("layers[1].mlp."):
            copies["layers[3]" + k[len("layers[1]"):]] = v
    copies["layers[2].attn.q.weight"] = out["layers[0].attn.q.weight"]
    a, fresh = materialize(after, SEQ, out, 0)
    assert fresh == []
    b, _ = materialize(before, SEQ, copies, 0)
    x, y = tokens()
    torch.testing.assert_close(a(x, y), b(x, y), rtol=1e-6, atol=1e-6)
    from effc.compiler.cost import estimate
    assert estimate(after, 2, SEQ).params_total == estimate(before, 2, SEQ).params_total - 3 * 32 * 64 - 32 * 32


def test_sparse_delta_lora_trains_a_masked_update_and_merges_without_loss():
    r = program("    prune m.layers[*].mlp.** with magnitude(sparsity=0.5)\n"
                "    adapt m.layers[*].mlp.up with lora(rank=2, sparse_delta=true)\n")
    prune, tr = steps(r)
    ir0, _ = model_ir(r, "m", prune.span)
    pruned = C.prune(prune.edit, ir0, fresh_state(r, prune.span), None).state
    ir, _ = model_ir(r, "m", tr.span)
    gm, _ = materialize(ir, SEQ, pruned, 0)
    state = state_of(gm, ir)
    state["layers[0].mlp.up.lora0.B"] = torch.randn(64, 2)
    gm, _ = materialize(ir, SEQ, state, 0)
    # reference: the dense model whose up weight is W + s (B A ⊙ M), the others as they are
    A, B = state["layers[0].mlp.up.lora0.A"], state["layers[0].mlp.up.lora0.B"]
    W = state["layers[0].mlp.up.weight"]
    s = ir.node("layers[0].mlp.up.lora0").attrs.scale
    plain, _ = model_ir(r, "m", prune.span)
    ref_state = {k: v for k, v in state.items() if ".lora0." not in k}
    ref_state["layers[0].mlp.up.weight"] = W + s * (B @ A) * (W != 0)
    ref, _ = materialize(plain, SEQ, ref_state, 0)
    x, y = tokens()
    torch.testing.assert_close(gm(x, y), ref(x, y), rtol=1e-5, atol=1e-5)
    dropped = {}
    merged = merged_state(ir, state, dropped)
    assert torch.equal(merged["layers[0].mlp.up.weight"] == 0, W == 0)
    assert dropped["layers[0].mlp.up.weight"] == 0.0  # nothing of the update was masked away at merge
    from effc.compiler.cost import estimate
    base = estimate(model_ir(r, "m", tr.span)[0], 2, SEQ)
    assert base.flops_forward_per_token > estimate(plain, 2, SEQ).flops_forward_per_token  # the dense update shows


@pytest.mark.parametrize("lora", [False, True])
def test_qat_fake_quantizes_the_weight_and_lsq_steps_train(lora):
    body = "    quantize m.layers[*].mlp.down to qat(bits=4, group=16)\n"
    if lora:
        body += "    adapt m.layers[*].mlp.down with lora(rank=2)\n"
    r = program(body)
    quant, tr = steps(r)
    ir0, _ = model_ir(r, "m", quant.span)
    state = C.quantize(quant.edit, ir0, fresh_state(r, quant.span), None).state
    W = state["layers[0].mlp.down.weight"]
    step = state["layers[0].mlp.down.step"]
    # LSQ's initial step: 2 mean|w| / sqrt(Qp) per (row, group), Qp = 7 at 4 bits
    torch.testing.assert_close(step, 2 * W.reshape(32, 4, 16).abs().mean(-1) / 7 ** 0.5)
    ir, _ = model_ir(r, "m", tr.span)
    gm, _ = materialize(ir, SEQ, state, 0)
    full = state_of(gm, ir)
    if lora:
        full["layers[0].mlp.down.lora0.B"] = torch.randn(32, 2) * 0.1
        gm, _ = materialize(ir, SEQ, full, 0)
    # reference: the dense model whose weights are the fake-quantized (merged) ones, by formula
    ref_state = {k: v for k, v in full.items() if ".lora0." not in k and not k.endswith(".step")}
    for i in range(4):
        w = full[f"layers[{i}].mlp.down.weight"]
        if lora:
            n = ir.node(f"layers[{i}].mlp.down.lora0")
            w = w + n.attrs.scale * full[f"layers[{i}].mlp.down.lora0.B"] @ full[f"layers[{i}].mlp.down.lora0.A"]
        s = full[f"layers[{i}].mlp.down.step"].repeat_interleave(16, dim=1)
        ref_state[f"layers[{i}].mlp.down.weight"] = torch.clamp(torch.round(w / s), -8, 7) * s
    plain, _ = model_ir(r, "m", quant.span)
    ref, _ = materialize(plain, SEQ, ref_state, 0)
    x, y = tokens()
    loss = gm(x, y)
    torch.testing.assert_close(loss, ref(x, y), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert gm.get_parameter("layers.0.mlp.down.step").grad.abs().sum() > 0
    assert gm.get_parameter("layers.0.mlp.down.step").requires_grad
    assert gm.get_parameter("layers.0.mlp.down.weight").requires_grad is (not lora)
