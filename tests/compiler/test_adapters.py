"""The adapter framework and its kinds: every kind is registered once, in the IR, the
registry and the passes; DoRA's and IA3's forward and gradients against their papers'
formulas written out here (the adapted weight built from the adapter's tensors, fed to
the base model's graph with torch.func.functional_call); merges that reproduce the
adapted model; parameter counts in the cost table; the checker's composition rule.
"""

import math
import zlib

import pytest
import torch
from torch.func import functional_call

from effc.compiler.adapters import KINDS, adapter_id, adapter_index
from effc.compiler.cost import estimate
from effc.compiler.ir import ADAPTERS, IR, Op, dump
from effc.compiler.lower import lower_model
from effc.compiler.passes import PASSES, PassContext, run_passes
from effc.compiler.pipeline import PASSES as PIPELINE
from effc.compiler.to_fx import fx_name
from effc.lang import registry as R
from effc.lang.check import check_source
from effc.runtime.model import materialize, merged_state, state_of

SEQ = 8
MODEL = "decoder(vocab=13, dim=24, layers=2, heads=4, kv_heads=2, ffn=20, seq=8)"


def build(make_model, body, decl=MODEL):
    info = make_model(decl, body)
    ir, _ = run_passes(lower_model(info), PIPELINE, PassContext(tuple(info.adapters)), verify_each=True)
    base = lower_model(info)
    return info, ir, base


def randomize(gm, ir, seed=0):
    """Seeded random values for every param: adapters far from their identity init, so
    that each part of a formula matters."""
    with torch.no_grad():
        for p in ir.params():
            if p.tied_to:
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(p.path.encode()))
            t = gm.get_parameter(fx_name(p.path))
            r = torch.randn(p.shape, generator=g)
            leaf = p.path.rsplit(".", 1)[-1]
            if leaf in ("m", "l"):  # magnitudes and scales near their init, never 0
                base = 1.0 if leaf == "l" else t.abs() + 0.5
                t.copy_(base * (1 + 0.3 * r))
            elif p.path.endswith("norm.weight"):
                t.copy_(1 + 0.3 * r)
            else:
                t.copy_(r / math.sqrt(p.shape[-1]))
    return gm


def tokens(vocab=13):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 7), generator=g), torch.randint(0, vocab, (2, 7), generator=g)


# ---------------------------------------------------------------- the framework


def test_every_kind_is_an_op_a_pass_and_a_registry_entry():
    assert {op.value for op in ADAPTERS} == set(KINDS) >= {"lora", "dora", "ia3"}
    for name, kind in KINDS.items():
        assert kind.name == name and Op(name) in ADAPTERS
        assert f"apply_{name}" in PASSES and f"apply_{name}" in PIPELINE
        entry = R.ADAPTERS.entries[name]
        assert entry.exclusive == (not kind.additive), name
    assert PIPELINE.index("assign_roles") == len(PIPELINE) - 1


def test_adapter_ids_order_a_weights_adapters():
    assert adapter_id("layers[0].attn.q", "lora", 0) == "layers[0].attn.q.lora0"
    assert adapter_id("layers[0].attn.k", "ia3", 12) == "layers[0].attn.k.ia3_12"
    assert adapter_index("layers[0].attn.k.ia3_12") == 12 and adapter_index("x.lora3") == 3


def test_ports_follow_declaration_order_across_passes(make_model):
    """Two additive adapters on one weight: ports in declaration order, even though
    apply_lora runs first. (A second LoRA kind is simulated by a second LoRA use.)"""
    info = make_model(MODEL, "    adapt m.layers[0].attn.q with lora(rank=2)\n"
                             "    adapt m.layers[0].attn.k with ia3()\n"
                             "    adapt m.layers[0].attn.v with dora(rank=2)\n")
    ir, report = run_passes(lower_model(info), PIPELINE, PassContext(tuple(info.adapters)), verify_each=True)
    assert ir.inputs("layers[0].attn.k") == ["layers[0].attn_norm", "layers[0].attn.k.ia3_1"]
    assert ir.inputs("layers[0].attn.v") == ["layers[0].attn_norm", "layers[0].attn.v.dora2"]
    assert report.count("apply_dora") == 1 and report.count("apply_ia3") == 1
    assert IR.from_json(ir.to_json()) == ir and dump(IR.from_json(ir.to_json())) == dump(ir)


# ---------------------------------------------------------------- DoRA against its formula

DORA = "    adapt m.layers[*].attn.{q,v} with dora(rank=2, alpha=6)\n    adapt m.layers[1].mlp.down with dora(rank=3)\n"


def dora_weight(W, A, B, m, scale):
    """Liu et al. 2024, eq. 5 with section 4.3's detached norm: m · V / ||V||_c, V = W + s B A,
    the norm of each output row (PEFT: torch.linalg.norm(W + s B A, dim=1))."""
    V = W + scale * B @ A
    return m[:, None] * V / torch.linalg.norm(V, dim=1).detach()[:, None]


def _reference(base_gm, ir, weights, build_weight):
    """The base model's graph with each adapted weight replaced by build_weight(node, tensors)."""
    params = {name: weights[name] for name, _ in base_gm.named_parameters()}
    for n in ir.nodes():
        if n.op in ADAPTERS:
            params[fx_name(f"{n.attrs.target}.weight")] = build_weight(n, weights)
    return params


def _compare(make_model, body, build_weight):
    info, ir, base = build(make_model, body)
    gm = randomize(materialize(ir, SEQ, {}, 0)[0], ir)
    base_gm, _ = materialize(base, SEQ, {}, 0)
    x, y = tokens()
    loss = gm(x, y)
    loss.backward()
    leaves = {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in gm.named_parameters()}
    ref = functional_call(base_gm, _reference(base_gm, ir, leaves, build_weight), (x, y))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    graded = 0
    for name, p in gm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-4, atol=1e-6)
            graded += 1
        else:
            assert p.grad is None, name  # the base is frozen
    return info, ir, gm, graded


def test_dora_forward_and_gradients_match_the_formula(make_model):
    def weight(n, t):
        a, p = n.attrs, fx_name(n.id)
        return dora_weight(t[fx_name(a.target) + ".weight"], t[p + ".A"], t[p + ".B"], t[p + ".m"],
                           a.alpha / a.rank)
    _, ir, _, graded = _compare(make_model, DORA, weight)
    assert graded == 3 * 5  # A, B and m of five adapters


def test_dora_starts_as_the_base_model_and_merges_exactly(make_model):
    info, ir, base = build(make_model, DORA)
    gm, fresh = materialize(ir, SEQ, {}, 0, output="logits")
    base_gm, _ = materialize(base, SEQ, {}, 0, output="logits")
    s = state_of(gm, ir)
    torch.testing.assert_close(s["layers[0].attn.q.dora0.m"], s["layers[0].attn.q.weight"].norm(dim=1))
    x, _ = tokens()
    torch.testing.assert_close(gm(x), base_gm(x), rtol=1e-6, atol=1e-6)
    randomize(gm, ir, seed=1)
    merged = merged_state(ir, state_of(gm, ir))
    merged_gm, fresh = materialize(base, SEQ, merged, 0, output="logits")
    assert fresh == []
    torch.testing.assert_close(merged_gm(x), gm(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- IA3 against its formula

IA3 = "    adapt m.layers[*].attn.{k,v} with ia3()\n    adapt m.layers[*].mlp.down with ia3()\n"


def test_ia3_forward_and_gradients_match_the_formula(make_model):
    """Liu et al. 2022: l_k ⊙ k, l_v ⊙ v, and (l_ff ⊙ h) W_down^T: the same as the weight
    diag(l) W for k and v and W diag(l) for the down projection (no biases here)."""
    def weight(n, t):
        W, l = t[fx_name(n.attrs.target) + ".weight"], t[fx_name(n.id) + ".l"]
        return W * l[None, :] if n.attrs.target.endswith("mlp.down") else l[:, None] * W
    _, ir, _, graded = _compare(make_model, IA3, weight)
    assert graded == 6
    scales = {n.attrs.target: (n.attrs.scales, n.attrs.features) for n in ir.nodes() if n.op is Op.IA3}
    assert scales["layers[0].attn.k"] == ("output", 12) and scales["layers[1].mlp.down"] == ("input", 20)


def test_ia3_starts_as_the_base_model_and_merges_exactly(make_model):
    info, ir, base = build(make_model, IA3)
    gm, _ = materialize(ir, SEQ, {}, 0, output="logits")
    base_gm, _ = materialize(base, SEQ, {}, 0, output="logits")
    x, _ = tokens()
    assert torch.equal(gm(x), base_gm(x))  # l = 1
    randomize(gm, ir, seed=2)
    merged_gm, fresh = materialize(base, SEQ, merged_state(ir, state_of(gm, ir)), 0, output="logits")
    assert fresh == []
    torch.testing.assert_close(merged_gm(x), gm(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- cost


def test_parameter_counts_in_the_cost_table(make_model):
    D, KV, F, L = 24, 12, 20, 2
    _, ir, base = build(make_model, DORA)
    c, b = estimate(ir, 2, SEQ), estimate(base, 2, SEQ)
    dora = L * (2 * (D + D) + D) + L * (2 * (D + KV) + KV) + (3 * (F + D) + D)  # A, B and m
    assert c.params_trainable == dict(c.params_by_role)["adapter"] == dora
    assert c.params_total == b.params_total + dora
    assert c.flops_forward_per_token - b.flops_forward_per_token == 2 * (dora - (L * D + L * KV + D))  # m is no matmul
    _, ir, _ = build(make_model, IA3)
    c = estimate(ir, 2, SEQ)
    assert c.params_trainable == L * (KV + KV + F) and c.flops_forward_per_token == b.flops_forward_per_token


# ---------------------------------------------------------------- the checker


def _check(body):
    src = f"pipeline t\nmodel m = {MODEL}\ndata d = markov(seq=8, vocab=2)\nstage s:\n{body}    train m on d (steps=1)\n"
    return check_source(src)


@pytest.mark.parametrize("first,second", [("lora(rank=2)", "dora(rank=2)"), ("ia3()", "lora(rank=2)"),
                                          ("dora(rank=2)", "ia3()")])
def test_a_rescaling_adapter_is_alone_on_its_weight(first, second):
    r = _check(f"    adapt m.layers[*].attn.v with {first}\n    adapt m.layers[0].attn.{{q,v}} with {second}\n")
    assert [d.code for d in r.diagnostics] == ["E0209"]
    assert "'layers[0].attn.v'" in r.diagnostics[0].message
    assert _check(f"    adapt m.layers[*].attn.v with {first}\n    adapt m.layers[0].attn.q with {second}\n").ok


def test_dora_rank_above_the_width_is_refused():
    r = _check("    adapt m.layers[0].attn.k with dora(rank=13)\n")
    assert [d.code for d in r.diagnostics] == ["E0309"]
