"""verify() on valid IRs and on IRs broken one invariant at a time."""

from dataclasses import replace

import pytest

from effc.compiler.ir import IR, IRError, LinearAttrs, LoraAttrs, Op, ParamRecord
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.verify import verify

TINY = "decoder(vocab=32, dim=8, layers=1, heads=2, kv_heads=1, ffn=16, seq=8{})"
ADAPT = "    adapt m.layers[0].attn.{q,v} with lora(rank=2)\n"


@pytest.fixture
def ir(make_model):
    info = make_model(TINY.format(""), ADAPT)
    ctx = PassContext(tuple(info.adapters))
    out, _ = run_passes(lower_model(info), ["apply_lora"], ctx)
    verify(out)
    return out


def with_param(ir, id, **changes):
    n = ir.node(id)
    return ir.with_nodes([replace(n, params=(replace(n.params[0], **changes),) + n.params[1:])])


def rewire(ir, old, new):
    return IR.build(ir.nodes(), [new if e == old else e for e in ir.edges()])


def test_cycle(ir):
    broken = IR.build(ir.nodes(), ir.edges() + [("layers[0].mlp_residual", "layers[0].attn_norm", 1)])
    with pytest.raises(IRError, match="cycle"):
        verify(broken)


def test_linear_weight_must_be_out_by_in(ir):
    with pytest.raises(IRError, match=r"'layers\[0\].attn.k'.*param shapes \[\(16, 8\)\]"):
        verify(with_param(ir, "layers[0].attn.k", shape=(16, 8)))


def test_attrs_record_must_match_op(ir):
    k = ir.node("layers[0].attn.k")
    with pytest.raises(IRError, match="attrs are LoraAttrs, expected LinearAttrs"):
        verify(ir.with_nodes([replace(k, attrs=LoraAttrs(2, 2.0, 0.0, "x"))]))


def test_input_width_must_agree(ir):
    # down reads the 8-wide residual instead of the 16-wide swiglu output
    broken = rewire(ir, ("layers[0].mlp.swiglu", "layers[0].mlp.down", 0),
                    ("layers[0].attn_residual", "layers[0].mlp.down", 0))
    with pytest.raises(IRError, match=r"input 0 from 'layers\[0\].attn_residual'.*expected width 16"):
        verify(broken)


def test_output_shape_must_agree_with_attrs(ir):
    n = ir.node("layers[0].mlp.gate")
    with pytest.raises(IRError, match="output shape"):
        verify(ir.with_nodes([replace(n, shape=("B", "T", 15))]))


def test_missing_input(ir):
    broken = IR.build(ir.nodes(), [e for e in ir.edges() if e[1] != "layers[0].attn.core" or e[2] != 2])
    with pytest.raises(IRError, match="has 2 inputs, expected 3"):
        verify(broken)


def test_lora_param_shapes(ir):
    lora = ir.node("layers[0].attn.v.lora0")
    a, b = lora.params
    broken = ir.with_nodes([replace(lora, params=(a, replace(b, shape=(16, 2))))])
    with pytest.raises(IRError, match=r"expected A \(2, 8\) and B \(4, 2\)"):
        verify(broken)


def test_lora_target_must_be_linear(ir):
    lora = ir.node("layers[0].attn.q.lora0")
    broken = ir.with_nodes([replace(lora, attrs=replace(lora.attrs, target="layers[0].attn.core"))])
    with pytest.raises(IRError, match="not a LINEAR node"):
        verify(broken)


def test_lora_must_feed_its_target(ir):
    broken = rewire(ir, ("layers[0].attn.q.lora0", "layers[0].attn.q", 1),
                    ("layers[0].attn.q.lora0", "layers[0].attn.o", 1))
    with pytest.raises(IRError, match="must feed exactly its target"):
        verify(broken)


def test_lora_must_read_its_targets_input(ir):
    broken = rewire(ir, ("layers[0].attn_norm", "layers[0].attn.q.lora0", 0),
                    ("embed", "layers[0].attn.q.lora0", 0))
    with pytest.raises(IRError, match=r"must read .layers\[0\]\.attn_norm., reads \[.embed.\]"):
        verify(broken)


def test_lora_out_must_match_target(ir):
    # v widened to 8 outputs: its 4-wide LoRA update no longer fits
    v = ir.node("layers[0].attn.v")
    wide = replace(v, attrs=LinearAttrs(8, 8), shape=("B", "T", 8),
                   params=(replace(v.params[0], shape=(8, 8)),))
    with pytest.raises(IRError, match=r"'layers\[0\].attn.v.lora0'.*output shape"):
        verify(ir.with_nodes([wide]))


def test_lora_rank_must_match_its_params(ir):
    lora = ir.node("layers[0].attn.q.lora0")
    with pytest.raises(IRError, match=r"expected A \(3, 8\) and B \(8, 3\)"):
        verify(ir.with_nodes([replace(lora, attrs=replace(lora.attrs, rank=3))]))


def test_param_paths_unique(ir):
    with pytest.raises(IRError, match="also used by"):
        verify(with_param(ir, "layers[0].attn.k", path="layers[0].attn.q.weight"))


def test_unknown_role(ir):
    with pytest.raises(IRError, match="unknown role 'bias'"):
        verify(with_param(ir, "norm", role="bias"))


def test_tied_param_must_name_an_existing_param_of_equal_shape(ir, make_model):
    with pytest.raises(IRError, match="not an untied param"):
        verify(with_param(ir, "head", tied_to="nowhere.weight"))
    with pytest.raises(IRError, match="of shape"):
        verify(with_param(ir, "head", tied_to="layers[0].attn.q.weight"))
    tied = lower_model(make_model(TINY.format(", tied=true")))
    verify(tied)
    with pytest.raises(IRError, match="disagree on trainable"):
        verify(with_param(tied, "head", trainable=False))


def test_needs_a_loss(ir):
    nodes = [n for n in ir.nodes() if n.op is not Op.LOSS]
    with pytest.raises(IRError, match="no LOSS"):
        verify(IR.build(nodes, [e for e in ir.edges() if e[1] != "loss"]))


def test_extra_param_on_a_parameterless_op(ir):
    core = ir.node("layers[0].attn.core")
    extra = ParamRecord("layers[0].attn.core.bias", (8,), "attention")
    with pytest.raises(IRError, match="param shapes"):
        verify(ir.with_nodes([replace(core, params=(extra,))]))


def test_node_is_frozen(ir):
    with pytest.raises(AttributeError):
        ir.node("embed").id = "x"
