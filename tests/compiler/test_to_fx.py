"""to_fx and the runtime's model helpers against an eager decoder written here in plain
torch (its own RMSNorm, complex-number rotary, explicit-softmax causal attention, SwiGLU
and LoRA), on the same weights: logits, summed loss, gradients, merged LoRA weights, the
fx graph's structure, the meta-device build, and deterministic initialisation.
"""

import math
import operator
import re
import zlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from effc.compiler.ir import Op
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.to_fx import loss_sum, to_fx
from effc.kernels.attention import attention
from effc.kernels.rotary import rotary_ref
from effc.runtime.model import materialize, merged_state, state_of

SEQ = 8
# float32 end to end; logits and the summed loss agree with the reference to RTOL, with
# an absolute floor of RTOL times the largest magnitude (logits near zero).
RTOL = 1e-5
GRAD_RTOL = 1e-4  # gradients pass through a few more float32 reductions

MHA = "decoder(vocab=13, dim=24, layers=1, heads=4, ffn=20, seq=8)"
GQA = "decoder(vocab=13, dim=24, layers=2, heads=4, kv_heads=2, ffn=20, seq=8, rope_theta=500.0, norm_eps=0.01)"
MQA_TIED = "decoder(vocab=13, dim=24, layers=3, heads=4, kv_heads=1, ffn=20, seq=8, tied=true)"
MODELS = {"mha": MHA, "gqa": GQA, "mqa_tied": MQA_TIED}

# LoRA on q and v of every layer and on mlp.down of layer 0: ids are `<target>.lora<i>`
# with i the adapt statement's index; the update is scaled by alpha / rank.
ADAPT = ("    adapt m.layers[*].attn.{q,v} with lora(rank=2, alpha=6)\n"
         "    adapt m.layers[0].mlp.down with lora(rank=3)\n")
ADAPT_LORAS = [(f"layers[{i}].attn.{w}", f"layers[{i}].attn.{w}.lora0", 6 / 2)
               for i in range(2) for w in ("q", "v")] + [("layers[0].mlp.down", "layers[0].mlp.down.lora1", 1.0)]


def build(make_model, decl, body="", extra=None):
    """The IR after apply_lora and assign_roles. `extra(adapters)` may edit the adapter
    list (the checker refuses two adapters of one kind on a weight, the IR allows it)."""
    info = make_model(decl, body)
    adapters = list(info.adapters) if extra is None else extra(list(info.adapters))
    ir, _ = run_passes(lower_model(info), ["apply_lora", "assign_roles"], PassContext(tuple(adapters)))
    return info.args, ir


def canonical(qualified):
    """`layers.0.attn.q.weight` -> `layers[0].attn.q.weight`."""
    return re.sub(r"\.(\d+)(?=\.)", r"[\1]", qualified)


def fill(gm, seed=0):
    """Seeded random values, each param's from its own name (so two graphs sharing a name
    get the same tensor); norms near 1, matrices ~ 1/sqrt(fan-in)."""
    with torch.no_grad():
        for name, p in gm.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * r if name.endswith("norm.weight") else r / math.sqrt(p.shape[-1]))
    return gm


def weights(gm):
    return {canonical(name): p.detach().clone() for name, p in gm.named_parameters()}


def inputs(vocab, B=2, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    targets[0, :2] = -100  # ignored (a prompt)
    targets[1, -1] = -100
    return tokens, targets


# ---------------------------------------------------------------- the reference decoder


def ref_rms_norm(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_rotary(x_BTD, heads, theta):
    """Channels (i, i + hd/2) of a head are the real and imaginary parts of z_i; position
    p multiplies z_i by exp(1j * p * theta^(-2i/hd))."""
    B, T, D = x_BTD.shape
    hd = D // heads
    x = x_BTD.reshape(B, T, heads, hd)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:])
    freq = theta ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freq  # (T, hd/2)
    rot = torch.polar(torch.ones_like(angle), angle).to(z.dtype)[None, :, None, :]
    z = z * rot
    return torch.cat((z.real, z.imag), -1).reshape(B, T, D)


def ref_attention(q, k, v, heads, kv_heads):
    B, T, D = q.shape
    hd = D // heads
    q = q.reshape(B, T, heads, hd).transpose(1, 2)  # (B, H, T, hd)
    k = k.reshape(B, T, kv_heads, hd).transpose(1, 2)
    v = v.reshape(B, T, kv_heads, hd).transpose(1, 2)
    group = torch.arange(heads) // (heads // kv_heads)  # query head -> its kv head
    k, v = k[:, group], v[:, group]
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)


def ref_logits(W, tokens, cfg, loras=()):
    """Llama-style pre-norm decoder on weights W (canonical path -> tensor). `loras`:
    (target path, adapter id, alpha/rank); y = x W^T + scale * (x A^T) B^T per adapter."""
    H = cfg["heads"]
    KV = cfg["kv_heads"] or H
    eps, theta = cfg["norm_eps"], cfg["rope_theta"]

    def lin(h, path):
        w = W["embed.weight"] if path == "head" and cfg["tied"] else W[f"{path}.weight"]
        y = h @ w.T
        for target, id, scale in loras:
            if target == path:
                y = y + scale * ((h @ W[f"{id}.A"].T) @ W[f"{id}.B"].T)
        return y

    x = W["embed.weight"][tokens]
    for i in range(cfg["layers"]):
        p = f"layers[{i}]"
        h = ref_rms_norm(x, W[f"{p}.attn_norm.weight"], eps)
        q = ref_rotary(lin(h, f"{p}.attn.q"), H, theta)
        k = ref_rotary(lin(h, f"{p}.attn.k"), KV, theta)
        x = x + lin(ref_attention(q, k, lin(h, f"{p}.attn.v"), H, KV), f"{p}.attn.o")
        h = ref_rms_norm(x, W[f"{p}.mlp_norm.weight"], eps)
        x = x + lin(F.silu(lin(h, f"{p}.mlp.gate")) * lin(h, f"{p}.mlp.up"), f"{p}.mlp.down")
    return lin(ref_rms_norm(x, W["norm.weight"], eps), "head")


def ref_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def assert_close(actual, expected, rtol=RTOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


# ---------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_loss_match_reference(make_model, name):
    cfg, ir = build(make_model, MODELS[name])
    gm_logits = fill(to_fx(ir, SEQ, output="logits"))
    gm_loss = fill(to_fx(ir, SEQ))
    W = weights(gm_logits)
    assert ("head.weight" in W) is not cfg["tied"]  # a tied head is no separate tensor
    for T in (7, SEQ):  # shorter than the rotary tables, and exactly their length
        tokens, targets = inputs(cfg["vocab"], T=T)
        want = ref_logits(W, tokens, cfg)
        got = gm_logits(tokens)
        assert got.shape == (2, T, cfg["vocab"])
        assert_close(got, want)
        assert_close(gm_loss(tokens, targets), ref_loss(want, targets))


def test_loss_is_a_sum_that_skips_ignored_targets(make_model):
    cfg, ir = build(make_model, MHA)
    gm = fill(to_fx(ir, SEQ))
    tokens, targets = inputs(cfg["vocab"])
    all_ignored = torch.full_like(targets, -100)
    assert gm(tokens, all_ignored).item() == 0.0
    # doubling the batch (same rows twice) doubles a sum, where a mean would not change
    two = gm(tokens.repeat(2, 1), targets.repeat(2, 1))
    assert_close(two, 2 * gm(tokens, targets))


@pytest.mark.parametrize("name", ["gqa", "mqa_tied"])
def test_full_finetune_gradients_match_reference(make_model, name):
    cfg, ir = build(make_model, MODELS[name])
    gm = fill(to_fx(ir, SEQ))
    W = {k: v.requires_grad_() for k, v in weights(gm).items()}
    tokens, targets = inputs(cfg["vocab"])
    gm(tokens, targets).backward()
    ref_loss(ref_logits(W, tokens, cfg), targets).backward()
    for name_, p in gm.named_parameters():
        assert p.requires_grad
        assert_close(p.grad, W[canonical(name_)].grad, rtol=GRAD_RTOL)


# ---------------------------------------------------------------- LoRA


def test_lora_forward_and_grads_match_reference(make_model):
    cfg, ir = build(make_model, GQA, ADAPT)
    gm = fill(to_fx(ir, SEQ))  # B random, not zero: the update matters
    W = weights(gm)
    adapter_keys = {f"{id}.{m}" for _, id, _ in ADAPT_LORAS for m in "AB"}
    assert {k for k in W if k.endswith((".A", ".B"))} == adapter_keys
    for k in adapter_keys:
        W[k].requires_grad_()
    tokens, targets = inputs(cfg["vocab"])

    loss = gm(tokens, targets)
    want = ref_loss(ref_logits(W, tokens, cfg, ADAPT_LORAS), targets)
    assert_close(loss, want)
    base = ref_loss(ref_logits(W, tokens, cfg), targets)
    assert not torch.allclose(want, base, rtol=1e-3)  # the adapters change the result

    loss.backward()
    want.backward()
    for name, p in gm.named_parameters():
        key = canonical(name)
        if key in adapter_keys:
            assert p.requires_grad and p.grad is not None
            assert_close(p.grad, W[key].grad, rtol=GRAD_RTOL)
        else:  # the frozen base
            assert not p.requires_grad and p.grad is None


def test_lora_on_tied_head_reads_the_embedding(make_model):
    cfg, ir = build(make_model, MQA_TIED, "    adapt m.head with lora(rank=2, alpha=3)\n")
    gm = fill(to_fx(ir, SEQ, output="logits"))
    W = weights(gm)
    tokens, _ = inputs(cfg["vocab"])
    assert_close(gm(tokens), ref_logits(W, tokens, cfg, [("head", "head.lora0", 1.5)]))


def second_q_adapter(adapters):
    """A second LoRA on layers[0].attn.q (rank 3, alpha 1), declared after the first."""
    first = adapters[0]
    return [first, replace(first, paths=frozenset({"layers[0].attn.q"}),
                           args={**first.args, "rank": 3, "alpha": 1.0})]


TWO_ON_Q = "    adapt m.layers[0].attn.{q,k} with lora(rank=2, alpha=4)\n"
TWO_ON_Q_LORAS = [("layers[0].attn.q", "layers[0].attn.q.lora0", 2.0),
                  ("layers[0].attn.k", "layers[0].attn.k.lora0", 2.0),
                  ("layers[0].attn.q", "layers[0].attn.q.lora1", 1 / 3)]


def test_two_adapters_on_one_weight_add_up(make_model):
    cfg, ir = build(make_model, MHA, TWO_ON_Q, extra=second_q_adapter)
    assert [n.id for n in ir.nodes() if n.op is Op.LORA] == [
        "layers[0].attn.q.lora0", "layers[0].attn.q.lora1", "layers[0].attn.k.lora0"]
    gm = fill(to_fx(ir, SEQ, output="logits"))
    W = weights(gm)
    tokens, _ = inputs(cfg["vocab"])
    got = gm(tokens)
    assert_close(got, ref_logits(W, tokens, cfg, TWO_ON_Q_LORAS))
    assert not torch.allclose(got, ref_logits(W, tokens, cfg, TWO_ON_Q_LORAS[:2]), rtol=1e-3)


def test_lora_dropout_is_identity_in_eval_mode(make_model):
    body = "    adapt m.layers[0].attn.q with lora(rank=2, alpha=4, dropout=0.5)\n"
    cfg, ir = build(make_model, MHA, body)
    gm = fill(to_fx(ir, SEQ, output="logits"))
    tokens, _ = inputs(cfg["vocab"])
    want = ref_logits(weights(gm), tokens, cfg, [("layers[0].attn.q", "layers[0].attn.q.lora0", 2.0)])
    assert_close(gm.eval()(tokens), want)
    torch.manual_seed(0)
    assert not torch.allclose(gm.train()(tokens), want, rtol=1e-3)  # training drops inputs


# ---------------------------------------------------------------- merged_state


def test_merged_state_folds_adapters_into_base_weights(make_model):
    cfg, ir = build(make_model, MHA, TWO_ON_Q, extra=second_q_adapter)
    _, base_ir = build(make_model, MHA)
    gm = fill(to_fx(ir, SEQ, output="logits"))
    state = state_of(gm, ir)
    merged = merged_state(ir, state)
    assert set(merged) == {p.path for p in base_ir.params() if p.tied_to is None}
    # W + sum over adapters of (alpha/r) B A, in float64 here
    for target in ("layers[0].attn.q", "layers[0].attn.k"):
        want = state[f"{target}.weight"].double()
        for t, id, scale in TWO_ON_Q_LORAS:
            if t == target:
                want = want + scale * state[f"{id}.B"].double() @ state[f"{id}.A"].double()
        assert_close(merged[f"{target}.weight"], want.float())
    assert torch.equal(merged["layers[0].attn.v.weight"], state["layers[0].attn.v.weight"])

    merged_gm, fresh = materialize(base_ir, SEQ, merged, seed=0, output="logits")
    assert fresh == []
    tokens, _ = inputs(cfg["vocab"])
    assert_close(merged_gm(tokens), gm(tokens))


def test_merged_state_unties_an_adapted_tied_head(make_model):
    """LoRA on a tied head updates the head only: the merged state has its own head.weight,
    which an untied model of the same shape reads."""
    cfg, ir = build(make_model, MQA_TIED, "    adapt m.head with lora(rank=2)\n")
    _, untied = build(make_model, MQA_TIED.replace("tied=true", "tied=false"))
    gm = fill(to_fx(ir, SEQ, output="logits"))
    state = state_of(gm, ir)
    merged = merged_state(ir, state)
    assert torch.equal(merged["embed.weight"], state["embed.weight"])
    merged_gm, fresh = materialize(untied, SEQ, merged, seed=0, output="logits")
    assert fresh == []
    tokens, _ = inputs(cfg["vocab"])
    assert_close(merged_gm(tokens), gm(tokens))


# ---------------------------------------------------------------- the graph itself

# The reference graph (no kernel swaps): the last fx node of each IR op.
TARGET = {Op.EMBEDDING: F.embedding, Op.RMSNORM: operator.mul, Op.ROTARY: rotary_ref,
          Op.ATTENTION_CORE: attention, Op.SWIGLU: operator.mul, Op.RESIDUAL_ADD: operator.add,
          Op.LORA: operator.mul, Op.LOSS: loss_sum}


def fx_node_name(id):
    """The fx node of IR node `layers[0].attn.core` is `layers_0_attn_core`."""
    return re.sub(r"\W", "_", re.sub(r"\[(\d+)\]", r".\1", id))


def named(gm):
    return {n.name: n for n in gm.graph.nodes}


def ancestors(node):
    seen, todo = set(), [node]
    while todo:
        for m in todo.pop().all_input_nodes:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_graph_mirrors_the_ir(make_model):
    body = ADAPT.replace("alpha=6)", "alpha=6, dropout=0.1)")
    _, ir = build(make_model, GQA, body)
    gm = to_fx(ir, SEQ, kernels="none")
    assert gm.meta["swaps"] == []
    names = [n.name for n in gm.graph.nodes]
    assert len(set(names)) == len(names)  # fx names are the generated code's variables
    by_name = named(gm)
    assert "layers_0_attn_core" in by_name and "layers_1_mlp_swiglu" in by_name
    fx_of = {n.id: by_name[fx_node_name(n.id)] for n in ir.nodes()}
    adapted = {n.attrs.target for n in ir.nodes() if n.op is Op.LORA}
    for n in ir.nodes():
        node = fx_of[n.id]
        if n.op is Op.LINEAR:
            assert node.target is (operator.add if n.id in adapted else F.linear)
        else:
            assert node.target is TARGET[n.op], n.id
        for src in ir.inputs(n.id):  # every IR edge is a data dependency in the graph
            assert fx_of[src] in ancestors(node)
    core = fx_of["layers[1].attn.core"]
    assert core.args == (fx_of["layers[1].attn.rope_q"], fx_of["layers[1].attn.rope_k"],
                         fx_of["layers[1].attn.v"], 4, 2)
    assert list(gm.graph.nodes)[-1].args[0] is fx_of["loss"]

    count = lambda op: sum(n.op is op for n in ir.nodes())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(n.target is F.linear for n in calls) == count(Op.LINEAR) + 2 * count(Op.LORA)
    # rms_norm_ref adds eps once
    assert sum(n.target is operator.add for n in calls) == count(Op.RESIDUAL_ADD) + count(Op.LORA) + count(Op.RMSNORM)
    dropped = sum(n.op is Op.LORA and n.attrs.dropout > 0 for n in ir.nodes())
    assert dropped == 4  # q and v of both layers; mlp.down's adapter has none
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == dropped  # one Dropout each
    # one get_attr per param read, plus one (cos, sin) pair: q and k share head width and base
    assert sum(n.op == "get_attr" for n in gm.graph.nodes) == len(ir.params()) + 2
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["tokens", "targets", "segments", "positions"]


def test_logits_graph_ends_at_the_head(make_model):
    _, ir = build(make_model, MQA_TIED)
    gm = to_fx(ir, SEQ, output="logits")
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["tokens", "segments", "positions"]
    out = list(gm.graph.nodes)[-1]
    assert out.op == "output" and out.args[0].name == "head"
    assert not any(n.target is loss_sum for n in gm.graph.nodes)
    with pytest.raises(ValueError):
        to_fx(ir, SEQ, output="probs")


@pytest.mark.parametrize("output", ["loss", "logits"])
def test_meta_graph_allocates_nothing_and_has_the_same_code(make_model, output):
    cfg, ir = build(make_model, GQA, ADAPT)
    meta = to_fx(ir, SEQ, device=torch.device("meta"), output=output)
    cpu = to_fx(ir, SEQ, output=output)
    assert all(p.is_meta for p in meta.parameters())
    assert all(b.is_meta for b in meta.buffers())
    assert meta.code == cpu.code
    assert [n for n, _ in meta.named_parameters()] == [n for n, _ in cpu.named_parameters()]
    assert {n: p.requires_grad for n, p in meta.named_parameters()} == \
        {n: p.requires_grad for n, p in cpu.named_parameters()}


# ---------------------------------------------------------------- materialize


def test_materialize_initialises_from_seed_and_path(make_model):
    _, ir = build(make_model, GQA)
    paths = [p.path for p in ir.params() if p.tied_to is None]
    gm1, fresh = materialize(ir, SEQ, {}, seed=7)
    gm2, _ = materialize(ir, SEQ, {}, seed=7)
    gm3, _ = materialize(ir, SEQ, {}, seed=8)
    assert fresh == paths
    s1, s2, s3 = state_of(gm1, ir), state_of(gm2, ir), state_of(gm3, ir)
    for path in paths:
        assert torch.equal(s1[path], s2[path])
        if not path.endswith("norm.weight"):  # norms start at 1 whatever the seed
            assert not torch.equal(s1[path], s3[path])
    # same shape, different paths: independent draws
    assert not torch.equal(s1["layers[0].mlp.gate.weight"], s1["layers[0].mlp.up.weight"])
    assert not torch.equal(s1["layers[0].attn.q.weight"], s1["layers[1].attn.q.weight"])
    # a param's init depends on its path, not on its neighbours: a 1-layer model shares
    # layers[0]'s q with the 2-layer one (attn.o and mlp.down are scaled by depth)
    _, one = build(make_model, GQA.replace("layers=2", "layers=1"))
    s_one = state_of(materialize(one, SEQ, {}, seed=7)[0], one)
    assert torch.equal(s_one["layers[0].attn.q.weight"], s1["layers[0].attn.q.weight"])
    assert torch.equal(s_one["embed.weight"], s1["embed.weight"])


def test_materialize_init_follows_the_documented_distributions(make_model):
    """N(0, 0.02) for embeddings and linears, N(0, 0.02/sqrt(2 layers)) for attn.o and
    mlp.down, norms 1, LoRA A uniform(+-1/sqrt(in)) and B 0. Sample stds of a few hundred
    draws: within 15%."""
    _, ir = build(make_model, GQA, ADAPT)
    s = state_of(materialize(ir, SEQ, {}, seed=0)[0], ir)
    for path, std in [("embed.weight", 0.02), ("layers[1].mlp.gate.weight", 0.02),
                      ("layers[0].attn.q.weight", 0.02), ("head.weight", 0.02),
                      ("layers[1].attn.o.weight", 0.01), ("layers[0].mlp.down.weight", 0.01)]:
        assert abs(s[path].std().item() / std - 1) < 0.15, path
        assert abs(s[path].mean().item()) < 3 * std / math.sqrt(s[path].numel()) + 1e-4, path
    assert all(torch.equal(t, torch.ones_like(t)) for p, t in s.items() if p.endswith("norm.weight"))
    A = s["layers[0].attn.q.lora0.A"]  # (2, 24): bound 1/sqrt(24)
    assert A.abs().max() <= 1 / math.sqrt(24) and A.abs().max() > 0.5 / math.sqrt(24)


def test_materialize_takes_given_params_from_the_state(make_model):
    _, ir = build(make_model, MHA)
    given = {"layers[0].attn.q.weight": torch.arange(24 * 24, dtype=torch.float32).reshape(24, 24)}
    gm, fresh = materialize(ir, SEQ, given, seed=0)
    assert "layers[0].attn.q.weight" not in fresh
    assert torch.equal(gm.get_parameter("layers.0.attn.q.weight"), given["layers[0].attn.q.weight"])
    with pytest.raises(ValueError):
        materialize(ir, SEQ, {"norm.weight": torch.ones(5)}, seed=0)


def test_adding_lora_keeps_the_base_init_and_the_function(make_model):
    cfg, base_ir = build(make_model, GQA)
    _, lora_ir = build(make_model, GQA, ADAPT)
    base_gm, _ = materialize(base_ir, SEQ, {}, seed=3, output="logits")
    lora_gm, fresh = materialize(lora_ir, SEQ, {}, seed=3, output="logits")
    base, lora = state_of(base_gm, base_ir), state_of(lora_gm, lora_ir)
    for path, t in base.items():
        assert torch.equal(lora[path], t), path
    for _, id, _ in ADAPT_LORAS:
        assert f"{id}.A" in fresh and f"{id}.B" in fresh
        assert torch.count_nonzero(lora[f"{id}.B"]) == 0
        assert torch.count_nonzero(lora[f"{id}.A"]) == lora[f"{id}.A"].numel()
    tokens, _ = inputs(cfg["vocab"])
    assert torch.equal(lora_gm(tokens), base_gm(tokens))  # B = 0: exactly the base model
