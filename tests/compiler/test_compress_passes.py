"""The compression passes on the IR: share_layers ties loops to their blocks, share_adapters
ties a shared adapter across loops (a per-loop one stays apart), prune_weights marks sparse
storage, quantize_linear replaces weights by their packed tensors; verify holds after each,
and the cost table's counts follow the formulas."""

from effc.compiler.cost import estimate, format_cost
from effc.compiler.ir import dump
from effc.compiler.passes import run_passes
from effc.compiler.pipeline import PASSES, model_ir
from effc.lang.check import check_source

MODEL = "model m = decoder(vocab=64, dim=32, layers=4, heads=4, ffn=64, seq=16)\n"


def _ir(body: str):
    src = f"pipeline t\n{MODEL}data d = markov(seq=16, vocab=64)\nstage s:\n{body}    train m on d (steps=1, batch=2)\n"
    r = check_source(src)
    assert r.ok, r.diagnostics
    ir, report = model_ir(r, "m", None)
    return ir, report, r


def _params(ir):
    return {p.path: p for p in ir.params()}


def test_recursive_share_ties_every_loop_to_its_block():
    ir, report, _ = _ir("    share m.layers[0:4] as recursive(blocks=2)\n")
    p = _params(ir)
    for i in (2, 3):
        for leaf in ("attn.q.weight", "mlp.down.weight", "attn_norm.weight"):
            rec = p[f"layers[{i}].{leaf}"]
            assert rec.tied_to == f"layers[{i - 2}].{leaf}" and rec.storage == "shared"
    assert p["layers[1].attn.q.weight"].tied_to is None
    # 2 looped layers x (4 attention + 3 MLP + 2 norm) params
    assert report.count("share_layers") == 18
    c = estimate(ir, 2, 16)
    per_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert c.params_total == 2 * 64 * 32 + 32 + 2 * per_layer  # embedding, head, final norm, 2 blocks
    assert "2 layers reuse earlier blocks" in format_cost(c)


def test_shared_adapters_tie_across_loops_and_per_loop_ones_do_not():
    ir, report, _ = _ir("    share m.layers[0:4] as recursive(blocks=2)\n"
                        "    adapt m.layers[*].attn.q with lora(rank=2)\n"
                        "    adapt m.layers[*].attn.q with lora(rank=2, per_loop=true)\n")
    p = _params(ir)
    assert p["layers[3].attn.q.lora0.A"].tied_to == "layers[1].attn.q.lora0.A"
    assert p["layers[1].attn.q.lora0.A"].tied_to is None
    assert all(p[f"layers[{i}].attn.q.lora1.A"].tied_to is None for i in range(4))
    c = estimate(ir, 2, 16)
    # trainable: 2 shared LoRAs (one per block) + 4 per-loop ones, each 2*32 + 32*2
    assert c.params_trainable == 6 * (2 * 32 + 32 * 2)


def test_prune_marks_sparse_storage_and_quantize_packs():
    ir, _, _ = _ir("    prune m.layers[*].mlp.** with nm(n=2, m=4)\n"
                   "    quantize m.layers[*].attn.{q,k} to int4(group=32)\n"
                   "    quantize m.layers[*].attn.v to nf4(group=32)\n"
                   "    quantize m.layers[*].attn.o to int8()\n")
    p = _params(ir)
    assert p["layers[0].mlp.up.weight"].storage == "sparse(2:4)"
    q = [x for x in p.values() if x.path.startswith("layers[0].attn.q.")]
    assert [(x.path.rsplit(".", 1)[1], x.shape, x.dtype) for x in q] == [
        ("qweight", (32, 16), "uint8"), ("scale", (32, 1), "float32"), ("zero", (32, 1), "uint8")]
    v = [(x.path.rsplit(".", 1)[1], x.shape, x.dtype) for x in p.values() if x.path.startswith("layers[0].attn.v.")]
    assert v == [("qweight", (32, 16), "uint8"), ("absmax_q", (32, 1), "int8"), ("absmax_scale", (1,), "float32"),
                 ("absmax_mean", (1,), "float32")]
    assert all(not x.trainable for x in p.values() if x.quantized)
    assert all(x.trainable for x in p.values() if not x.quantized)  # no adapters: the rest trains
    # bytes: per layer int4 q,k: 2 * (32*16 + 32*4 + 32) ; nf4 v: 32*16 + 32 + 4 + 4 ; int8 o: 32*32 + 32*4
    c = estimate(ir, 2, 16)
    dense = 4 * (2 * 64 * 32 + 32 + 4 * (2 * 32 + 3 * 32 * 64))
    packed = 4 * (2 * (32 * 16 + 32 * 4 + 32) + (32 * 16 + 32 + 4 + 4) + (32 * 32 + 32 * 4))
    assert c.weight_bytes == dense + packed
    assert c.params_total == 2 * 64 * 32 + 32 + 4 * (2 * 32 + 3 * 32 * 64 + 4 * 32 * 32)
    # FLOPs do not change with storage: a quantized matmul multiplies as many weights
    dense_ir, _, _ = _ir("")
    assert c.flops_forward_per_token == estimate(dense_ir, 2, 16).flops_forward_per_token


def test_edits_apply_in_order_of_the_statements_before_a_point():
    src = (f"pipeline t\n{MODEL}data d = markov(seq=16, vocab=64)\nstage s:\n    train m on d (steps=1)\n"
           "    quantize m.layers[*].attn.q to int8()\n    train m on d (steps=1)\n")
    r = check_source(src)
    first, second = [s for s in r.stages[0].steps if s.kind == "train"]
    before, _ = model_ir(r, "m", first.span)
    after, _ = model_ir(r, "m", second.span)
    assert not before.node("layers[0].attn.q").attrs.quant
    assert after.node("layers[0].attn.q").attrs.quant == "int8"


def test_passes_verify_after_each_and_leave_their_input_unchanged():
    _, _, r = _ir("    share m.layers[0:4] as recursive(blocks=2, init=lower)\n"
                  "    adapt m.layers[*].attn.{q,v} with lora(rank=2)\n"
                  "    prune m.layers[*].mlp.** with magnitude(sparsity=0.5)\n"
                  "    quantize m.layers[*].attn.**:linear to int4(group=32)\n")
    from effc.compiler.lower import lower_model
    from effc.compiler.passes import PassContext
    info = r.models["m"]
    base = lower_model(info)
    text = dump(base)
    out, _ = run_passes(base, PASSES, PassContext(tuple(info.adapters), tuple(info.edits)), verify_each=True)
    assert dump(base) == text and dump(out) != text
