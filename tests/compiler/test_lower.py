"""Lowering a decoder: exact parameter counts against the hand formula, canonical ids,
GQA widths, the tied head, and purity."""

import copy

from effc.compiler.cost import estimate
from effc.compiler.ir import Op, dump
from effc.compiler.lower import lower_model
from effc.compiler.verify import verify
from effc.lang.tree import decoder_tree, walk, Selected

GQA = "decoder(vocab=64, dim=16, layers=2, heads=4, kv_heads=2, ffn=24, seq=8{})"


def decoder_params(V, D, L, F, kv, tied):
    """embed V*D; per layer two norms 2D, q and o D*D each, k and v D*kv each, three MLP
    matrices D*F; final norm D; an untied head V*D."""
    return V * D + L * (2 * D + 2 * D * D + 2 * D * kv + 3 * D * F) + D + (0 if tied else V * D)


def test_untied_gqa_param_count(make_model):
    ir = lower_model(make_model(GQA.format("")))
    verify(ir)
    # head_dim = 16/4 = 4, kv width = 2*4 = 8
    want = decoder_params(64, 16, 2, 24, 8, tied=False)
    assert want == 1024 + 2 * (32 + 512 + 256 + 1152) + 16 + 1024 == 5968
    cost = estimate(ir, 1, 8)
    assert cost.params_total == cost.params_trainable == want
    assert dict(cost.params_by_role) == {"embedding": 1024, "head": 1024, "norm": 5 * 16,
                                         "attention": 2 * (512 + 256), "mlp": 2 * 1152}


def test_tied_head_counts_the_embedding_once(make_model):
    ir = lower_model(make_model(GQA.format(", tied=true")))
    verify(ir)
    head = ir.node("head")
    assert head.params[0].tied_to == "embed.weight" and head.params[0].shape == (64, 16)
    cost = estimate(ir, 1, 8)
    assert cost.params_total == decoder_params(64, 16, 2, 24, 8, tied=True) == 4944
    assert "head" not in dict(cost.params_by_role)


def test_mha_when_kv_heads_is_omitted(make_model):
    ir = lower_model(make_model("decoder(vocab=64, dim=16, layers=1, heads=4, ffn=24, seq=8)"))
    assert ir.node("layers[0].attn.k").params[0].shape == (16, 16)
    core = ir.node("layers[0].attn.core").attrs
    assert (core.heads, core.kv_heads, core.head_dim) == (4, 4, 4)


def test_linear_ids_are_the_canonical_paths_with_their_shapes(make_model):
    info = make_model(GQA.format(""))
    ir = lower_model(info)
    tree = [s for s in walk(Selected("", decoder_tree(info.args))) if s.module.kind == "linear"]
    assert len(tree) == 2 * 7 + 1
    for s in tree:
        node = ir.node(s.path)
        assert node.op is Op.LINEAR
        i, o = s.module.shape
        assert (node.attrs.in_features, node.attrs.out_features) == (i, o)
        assert node.params[0].shape == (o, i)


def test_block_wiring_and_spans(make_model):
    info = make_model(GQA.format(""))
    ir = lower_model(info)
    assert ir.inputs("layers[1].attn_norm") == ["layers[0].mlp_residual"]
    assert ir.inputs("layers[0].attn.core") == ["layers[0].attn.rope_q", "layers[0].attn.rope_k",
                                                "layers[0].attn.v"]
    assert ir.inputs("layers[0].attn_residual") == ["embed", "layers[0].attn.o"]
    assert ir.node("layers[0].attn.k").shape == ("B", "T", 8)
    assert ir.node("loss").shape == ()
    assert all(n.span.key() == info.span.key() for n in ir.nodes())
    assert info.span.line == 2


def test_lowering_is_pure_and_deterministic(make_model):
    info = make_model(GQA.format(", tied=true"))
    before = copy.deepcopy(info.args)
    a, b = lower_model(info), lower_model(info)
    assert a == b and dump(a) == dump(b)
    assert info.args == before
