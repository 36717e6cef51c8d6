"""The IR API: JSON round trip, helpers that return new IRs, the text dump."""

from dataclasses import replace

import pytest

from effc.compiler.ir import ADAPTERS, IR, MATMULS, PARAMETRIC, IRError, Op, dump
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes

TINY = "decoder(vocab=32, dim=8, layers=2, heads=2, kv_heads=1, ffn=16, seq=8, tied=true)"
ADAPT = "    adapt m.layers[*].attn.{q,v} with lora(rank=2, dropout=0.1)\n"


def test_op_groups():
    assert Op.LORA in ADAPTERS and Op.LORA in MATMULS and Op.LORA in PARAMETRIC
    assert Op.LINEAR in MATMULS and Op.LINEAR not in ADAPTERS
    assert Op.ROTARY not in PARAMETRIC


def test_json_round_trip_after_passes(make_model):
    info = make_model(TINY, ADAPT)
    ctx = PassContext(tuple(info.adapters))
    ir, _ = run_passes(lower_model(info), ["apply_lora", "assign_roles"], ctx)
    back = IR.from_json(ir.to_json())
    assert back == ir
    assert dump(back) == dump(ir)
    assert back.to_json() == ir.to_json()
    # Spans compare equal to any span, so check their positions explicitly.
    spans = [n.span.key() for n in ir.nodes()]
    assert [n.span.key() for n in back.nodes()] == spans
    assert back.node("layers[1].attn.v.lora0").span.line == 5


def test_with_nodes_returns_a_new_ir(make_model):
    ir = lower_model(make_model(TINY))
    text = dump(ir)
    q = ir.node("layers[0].attn.q")
    frozen = replace(q, params=tuple(replace(p, trainable=False) for p in q.params))
    new = ir.with_nodes([frozen])
    assert not new.node("layers[0].attn.q").params[0].trainable
    assert ir.node("layers[0].attn.q").params[0].trainable and dump(ir) == text
    with pytest.raises(IRError, match="unknown node ids"):
        ir.with_nodes([replace(q, id="nope")])


def test_graph_property_is_a_copy(make_model):
    ir = lower_model(make_model(TINY))
    g = ir.graph
    g.remove_node("loss")
    assert "loss" in ir


def test_nodes_are_topological(make_model):
    ir = lower_model(make_model(TINY))
    seen = set()
    for n in ir.nodes():
        assert set(ir.inputs(n.id)) <= seen
        seen.add(n.id)
    assert ir.nodes()[0].id == "embed" and ir.nodes()[-1].id == "loss"


def test_build_rejects_edges_to_unknown_nodes(make_model):
    ir = lower_model(make_model(TINY))
    with pytest.raises(IRError, match="unknown node 'ghost'"):
        IR.build(ir.nodes(), ir.edges() + [("ghost", "loss", 1)])
