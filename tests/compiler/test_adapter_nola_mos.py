"""NOLA and MoS (compiler/adapters/nola.py, mos.py), the shared- and generated-basis
low-rank kinds, on a grouped-query decoder.

Each kind's forward loss and the gradient of every trainable param are compared with the
paper's formula written out here: the adapted weight built from the adapter's tensors
(NOLA's bases made independently from the documented distribution and seed rule; MoS's
A and B concatenated shard by shard from one pool tensor per shape group, so a shared
pool's gradient is autograd's sum over its uses) and fed to the base model's graph with
torch.func.functional_call. Also: the init is the base model; merges reproduce the
adapted model; MoS with one target, shards=1, pool=rank and the identity index is LoRA
(forward and gradients, through LoRA's own lowering); the cost table's parameter counts
against their formulas, and its activation bytes against a measured training step; the
KV-cache decoder against the fx graph; NOLA's bases are the same in every build and are
never stored; tied pools are stored, optimised and exported once; a real run's merged
export against its unmerged snapshot; the checker's refusals.
"""

import hashlib
import math
import zlib
from dataclasses import dataclass

import networkx as nx
import pytest
import torch
from torch.func import functional_call

from effc.compiler.adapters.mos import shard_index
from effc.compiler.cost import estimate
from effc.compiler.ir import ADAPTERS, IR
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.pipeline import PASSES, model_ir
from effc.compiler.swaps import COSTED
from effc.compiler.to_fx import fx_name, to_fx
from effc.lang.check import check_source
from effc.runtime.checkpoint import read_tensors, write_tensors
from effc.runtime.export import adapter_paths, export_effc
from effc.runtime.generate import Decoder
from effc.runtime.memory import measure_step, warm_adamw
from effc.runtime.model import materialize, merged_state, state_of, trainable

SEQ = 8
MODEL = "decoder(vocab=13, dim=24, layers=2, heads=4, kv_heads=2, ffn=20, seq=8)"
D, KV, F, L = 24, 12, 20, 2  # dim, kv_heads * head_dim, ffn, layers

NOLA = ("    adapt m.layers[*].attn.{q,v} with nola(rank=2, bases=8, alpha=6)\n"
        "    adapt m.layers[1].mlp.down with nola(rank=3, bases=5, seed=4)\n")
# Shape groups: {q, o} (24 -> 24) and {k, v} (24 -> 12) of both layers share pools; the
# down projections (20 -> 24) of the second statement share their own.
MOS = ("    adapt m.layers[*].attn.{q,k,v,o} with mos(rank=2, pool=6, shards=2, alpha=3)\n"
       "    adapt m.layers[*].mlp.down with mos(rank=3, pool=4)\n")


pytestmark = pytest.mark.usefixtures("one_thread")


def build(make_model, body, decl=MODEL):
    info = make_model(decl, body)
    ir, _ = run_passes(lower_model(info), PASSES, PassContext(tuple(info.adapters)), verify_each=True)
    assert IR.from_json(ir.to_json()) == ir  # attrs, generated storage and ties survive the round trip
    return info, ir, lower_model(info)


def randomize(gm, ir, seed=0):
    """Seeded random values for every stored param (the adapters far from their init);
    generated bases are left as the graph made them."""
    with torch.no_grad():
        for p in ir.params():
            if p.tied_to or p.storage == "generated":
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(p.path.encode()))
            r = torch.randn(p.shape, generator=g)
            t = gm.get_parameter(fx_name(p.path))
            t.copy_(1 + 0.3 * r if p.path.endswith("norm.weight") else r / math.sqrt(p.shape[-1]))
    return gm


def tokens(vocab=13):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 7), generator=g), torch.randint(0, vocab, (2, 7), generator=g)


def adapters(ir):
    return [n for n in ir.nodes() if n.op in ADAPTERS]


# ---------------------------------------------------------------- the formulas, written out


def nola_bases(seed: int, target: str, leaf: str, shape: tuple) -> torch.Tensor:
    """NOLA's bases: uniform(-1, 1) / sqrt(k) (the authors' GenerateParams), drawn from a
    generator seeded by sha256("nola:{seed}:{target}:{leaf}") alone."""
    digest = hashlib.sha256(f"nola:{seed}:{target}:{leaf}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.empty(shape).uniform_(-1.0, 1.0, generator=g) / math.sqrt(shape[0])


def nola_weight(n, W, t):
    """Koohpayegani et al. 2024: W + (alpha/r) · B A with A = Σ_i a_i A_i, B = Σ_j b_j B_j."""
    a, p = n.attrs, fx_name(n.id)
    out, in_ = W.shape
    A_bases = nola_bases(a.seed, a.target, "A_bases", (a.bases, a.rank, in_))
    B_bases = nola_bases(a.seed, a.target, "B_bases", (a.bases, out, a.rank))
    A = sum(t[p + ".a"][i] * A_bases[i] for i in range(a.bases))
    B = sum(t[p + ".b"][j] * B_bases[j] for j in range(a.bases))
    return W + a.alpha / a.rank * B @ A


def pool_of(n, leaf: str) -> str:
    """The fx name of the pool tensor a MoS node reads (its own, or the one it is tied to)."""
    p = next(q for q in n.params if q.path.endswith("." + leaf))
    return fx_name(p.tied_to or p.path)


def mos_weight(n, W, t):
    """Wang et al. 2024: row k of A (r, in) is the concatenation of the A pool's shards
    index_A[k][0..L-1], column k of B (out, r) that of the B pool's shards index_B[k];
    W + (alpha/r) · B A."""
    a = n.attrs
    PA, PB = t[pool_of(n, "PA")], t[pool_of(n, "PB")]
    A = torch.stack([torch.cat([PA[i] for i in row]) for row in shard_index(a, "A")])
    B = torch.stack([torch.cat([PB[i] for i in col]) for col in shard_index(a, "B")], dim=1)
    return W + a.alpha / a.rank * B @ A


def _reference_params(base_gm, ir, leaves, weight):
    """The base model's params with each adapted weight replaced by its formula."""
    params = {name: leaves[name] for name, _ in base_gm.named_parameters()}
    for n in adapters(ir):
        key = fx_name(f"{n.attrs.target}.weight")
        params[key] = weight(n, params[key], leaves)
    return params


def _compare(make_model, body, weight):
    """Loss and every gradient of the adapted graph against the formula; returns the
    names of the params that have a gradient. Float32: the two graphs assemble the weight
    in different orders, and the rounding differences pass through every later op."""
    _, ir, base = build(make_model, body)
    gm = randomize(materialize(ir, SEQ, {}, 0)[0], ir)
    base_gm, _ = materialize(base, SEQ, {}, 0)
    x, y = tokens()
    loss = gm(x, y)
    loss.backward()
    leaves = {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in gm.named_parameters()}
    ref = functional_call(base_gm, _reference_params(base_gm, ir, leaves, weight), (x, y))
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    graded = []
    for name, p in gm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-4, atol=1e-5)
            graded.append(name)
        else:
            assert p.grad is None, name  # the base and the bases are frozen
    return ir, graded


# ---------------------------------------------------------------- NOLA


def test_nola_forward_and_gradients_match_the_formula(make_model):
    ir, graded = _compare(make_model, NOLA, nola_weight)
    assert sorted(graded) == sorted(fx_name(f"{n.id}.{c}") for n in adapters(ir) for c in "ab")  # 5 adapters


def test_nola_bases_are_the_documented_ones_in_every_build(make_model):
    """The same bases whatever the run's seed (which does change the coefficients), made
    from NOLA's seed and the target only; another NOLA seed gives other bases."""
    _, ir, _ = build(make_model, NOLA)
    gm0, fresh = materialize(ir, SEQ, {}, 0)
    gm1, _ = materialize(ir, SEQ, {}, 1)
    for n in adapters(ir):
        for p in n.params[2:]:
            leaf, name = p.path.rsplit(".", 1)[-1], fx_name(p.path)
            want = nola_bases(n.attrs.seed, n.attrs.target, leaf, p.shape)
            assert torch.equal(gm0.get_parameter(name), want) and torch.equal(gm1.get_parameter(name), want)
            assert p.path not in fresh  # made, not initialised as a new param of the state
        a = fx_name(n.id) + ".a"
        assert not torch.equal(gm0.get_parameter(a), gm1.get_parameter(a))
    _, other, _ = build(make_model, NOLA.replace("alpha=6", "alpha=6, seed=1"))
    q = fx_name("layers[0].attn.q.nola0.A_bases")
    assert not torch.equal(materialize(other, SEQ, {}, 0)[0].get_parameter(q), gm0.get_parameter(q))


def test_nola_starts_as_the_base_model_and_is_no_stationary_point(make_model):
    """b = 0: the base model's logits. a is random (A at LoRA's kaiming scale): the first
    backward gives b a gradient, which a = b = 0 would not."""
    _, ir, base = build(make_model, NOLA)
    gm, _ = materialize(ir, SEQ, {}, 0)
    base_gm, _ = materialize(base, SEQ, {}, 0)
    x, y = tokens()
    torch.testing.assert_close(gm(x, y), base_gm(x, y), rtol=0, atol=0)
    gm(x, y).backward()
    for n in adapters(ir):
        bound = math.sqrt(3 / ir.node(n.attrs.target).attrs.in_features)
        a, b = (gm.get_parameter(fx_name(f"{n.id}.{c}")) for c in "ab")
        assert torch.all(b == 0) and b.grad.abs().max() > 0
        assert a.abs().max() <= bound and a.abs().min() > 0


def test_nola_merges_exactly(make_model):
    _, ir, base = build(make_model, NOLA)
    gm = randomize(materialize(ir, SEQ, {}, 0, output="logits")[0], ir, seed=1)
    merged = merged_state(ir, state_of(gm, ir))
    assert not any(".nola" in k for k in merged)
    merged_gm, fresh = materialize(base, SEQ, merged, 0, output="logits")
    assert fresh == []
    x, _ = tokens()
    torch.testing.assert_close(merged_gm(x), gm(x), rtol=1e-5, atol=1e-5)


def test_nola_bases_are_never_stored_and_a_reload_is_identical(make_model, tmp_path):
    info, ir, _ = build(make_model, NOLA)
    gm = randomize(materialize(ir, SEQ, {}, 0, output="logits")[0], ir, seed=2)
    state = state_of(gm, ir)
    assert not any(k.endswith(("A_bases", "B_bases")) for k in state)
    assert {p for p in adapter_paths(ir)} == {f"{n.id}.{c}" for n in adapters(ir) for c in "ab"}
    write_tensors(tmp_path / "model.safetensors", state)
    again, fresh = materialize(ir, SEQ, read_tensors(tmp_path / "model.safetensors"), 7, output="logits")
    assert fresh == []
    x, _ = tokens()
    assert torch.equal(again(x), gm(x))
    (tmp_path / "export").mkdir()  # the caller owns the folder (runtime/export.py)
    export_effc(tmp_path / "export", ir, state, info, merge=False, pipeline="t")
    assert set(read_tensors(tmp_path / "export" / "adapters.safetensors")) == adapter_paths(ir)
    assert not set(read_tensors(tmp_path / "export" / "model.safetensors")) & adapter_paths(ir)


def test_nola_counts_coefficients_as_params_and_bases_as_weight_bytes(make_model):
    _, ir, base = build(make_model, NOLA)
    c, b = estimate(ir, 2, SEQ), estimate(base, 2, SEQ)
    coefficients = L * 2 * (2 * 8) + 2 * 5  # a and b of the q and v adapters, then of down's
    bases = L * (8 * 2 * (D + D) + 8 * 2 * (D + KV)) + 5 * 3 * (F + D)  # (k, r, in) and (k, out, r)
    assert c.params_trainable == dict(c.params_by_role)["adapter"] == coefficients
    assert c.params_total == b.params_total + coefficients
    assert c.weight_bytes == b.weight_bytes + 4 * (coefficients + bases)
    # per token, a rank-r LoRA: 2 r (in + out) forward per adapter
    assert c.flops_forward_per_token - b.flops_forward_per_token == 2 * (L * 2 * (2 * D + D + KV) + 3 * (F + D))


# ---------------------------------------------------------------- MoS


def test_mos_forward_and_gradients_match_the_formula(make_model):
    """Every pool's gradient is the sum over the weights that draw from it (the reference
    reads one leaf per pool for all of them)."""
    ir, graded = _compare(make_model, MOS, mos_weight)
    owners = {p.path for n in adapters(ir) for p in n.params if p.tied_to is None}
    assert sorted(graded) == sorted(map(fx_name, owners)) and len(owners) == 2 * 3  # 3 shape groups


def test_mos_pools_are_shared_per_shape_group_and_tied(make_model):
    _, ir, _ = build(make_model, MOS)
    groups = {}
    for n in adapters(ir):
        t = ir.node(n.attrs.target).attrs
        groups.setdefault((n.id.rsplit(".", 1)[-1], t.in_features, t.out_features), []).append(n)
    assert sorted((k, len(v)) for k, v in groups.items()) == [(("mos0", 24, 12), 4), (("mos0", 24, 24), 4),
                                                              (("mos1", 20, 24), 2)]
    for nodes in groups.values():
        owner = min(nodes, key=lambda n: n.id)
        assert all(p.tied_to is None for p in owner.params)
        for n in nodes:
            if n is not owner:
                assert [p.tied_to for p in n.params] == [p.path for p in owner.params]
    assert IR.from_json(ir.to_json()) == ir


def test_mos_shard_choice_is_distinct_dissociated_and_recomputed_from_the_attrs(make_model):
    _, ir, _ = build(make_model, MOS)
    nodes = adapters(ir)
    for n in nodes:
        a = n.attrs
        for which in "AB":
            idx = shard_index(a, which)
            flat = [i for row in idx for i in row]
            assert len(idx) == a.rank and all(len(row) == a.shards for row in idx)
            assert len(set(flat)) == len(flat) and all(0 <= i < a.pool for i in flat)  # subset selection
    assert any(shard_index(n.attrs, "A") != shard_index(n.attrs, "B") for n in nodes)  # pair dissociation
    assert len({str(shard_index(n.attrs, "A")) for n in nodes}) > 1  # each weight draws its own subset
    again = IR.from_json(ir.to_json())
    assert all(shard_index(again.node(n.id).attrs, w) == shard_index(n.attrs, w) for n in nodes for w in "AB")


def test_mos_starts_as_the_base_model_and_merges_exactly(make_model):
    _, ir, base = build(make_model, MOS)
    gm, _ = materialize(ir, SEQ, {}, 0, output="logits")
    base_gm, _ = materialize(base, SEQ, {}, 0, output="logits")
    x, _ = tokens()
    assert torch.equal(gm(x), base_gm(x))  # P_B = 0
    pa = gm.get_parameter(pool_of(ir.node("layers[1].attn.q.mos0"), "PA"))
    assert 0 < pa.abs().max() <= 1 / math.sqrt(D)  # LoRA's A: ±1/sqrt(in), in the full input width
    randomize(gm, ir, seed=1)
    merged = merged_state(ir, state_of(gm, ir))
    assert not any(".mos" in k for k in merged)
    merged_gm, fresh = materialize(base, SEQ, merged, 0, output="logits")
    assert fresh == []
    torch.testing.assert_close(merged_gm(x), gm(x), rtol=1e-5, atol=1e-5)


def test_mos_with_one_target_one_shard_and_the_identity_index_is_lora(make_model):
    """pool = rank, shards = 1 and a seed whose draws are the identity: A is the pool P_A
    and B is P_B transposed, so LoRA with those tensors, through LoRA's own lowering,
    must give the same loss, and its A and B gradients must be the pools' gradients."""
    from effc.compiler.adapters.mos import MosAttrs

    ident = [[0], [1], [2]]
    seed = next(s for s in range(500) if all(shard_index(MosAttrs(3, 3, 1, 5.0, s, "layers[1].attn.v"), w) == ident
                                             for w in "AB"))
    _, mos_ir, _ = build(make_model, f"    adapt m.layers[1].attn.v with mos(rank=3, pool=3, alpha=5, seed={seed})\n")
    _, lora_ir, _ = build(make_model, "    adapt m.layers[1].attn.v with lora(rank=3, alpha=5)\n")
    mos = randomize(materialize(mos_ir, SEQ, {}, 0)[0], mos_ir, seed=3)
    state = state_of(mos, mos_ir)
    state["layers[1].attn.v.lora0.A"] = state.pop("layers[1].attn.v.mos0.PA")
    state["layers[1].attn.v.lora0.B"] = state.pop("layers[1].attn.v.mos0.PB").T.contiguous()
    lora, fresh = materialize(lora_ir, SEQ, state, 0)
    assert fresh == []
    x, y = tokens()
    mos_loss, lora_loss = mos(x, y), lora(x, y)
    mos_loss.backward()
    lora_loss.backward()
    torch.testing.assert_close(mos_loss, lora_loss, rtol=1e-6, atol=1e-6)
    v = "layers.1.attn.v"
    torch.testing.assert_close(mos.get_parameter(f"{v}.mos0.PA").grad, lora.get_parameter(f"{v}.lora0.A").grad)
    torch.testing.assert_close(mos.get_parameter(f"{v}.mos0.PB").grad, lora.get_parameter(f"{v}.lora0.B").grad.T)
    assert estimate(mos_ir, 2, SEQ).params_trainable == estimate(lora_ir, 2, SEQ).params_trainable == 3 * (D + KV)


def test_mos_counts_two_pools_per_shape_group_not_per_layer(make_model):
    _, ir, base = build(make_model, MOS)
    c, b = estimate(ir, 2, SEQ), estimate(base, 2, SEQ)
    pools = 6 * (D + D) // 2 + 6 * (D + KV) // 2 + 4 * (F + D)  # (pool, in/L) and (pool, out/L) per group
    assert c.params_trainable == dict(c.params_by_role)["adapter"] == pools
    assert c.params_total == b.params_total + pools and c.weight_bytes == b.weight_bytes + 4 * pools
    lora = L * 2 * (2 * (D + D) + 2 * (D + KV)) + L * 3 * (F + D)  # r (in + out): q, o, k, v; then down
    assert c.flops_forward_per_token - b.flops_forward_per_token == 2 * lora
    gm, _ = materialize(ir, SEQ, {}, 0)
    assert len(trainable(gm, ir)) == 2 * 3 and len(state_of(gm, ir)) == len(state_of(gm, base)) + 2 * 3
    assert adapter_paths(ir) == {p.path for n in adapters(ir) for p in n.params if p.tied_to is None}


# ---------------------------------------------------------------- both: the decoder, memory


@pytest.mark.parametrize("body", [NOLA, MOS], ids=["nola", "mos"])
def test_the_kv_cache_decoder_gives_the_graphs_logits(make_model, body):
    _, ir, _ = build(make_model, body)
    gm = randomize(materialize(ir, SEQ, {}, 0, output="logits")[0], ir, seed=4).eval()
    x = torch.randint(0, 13, (2, SEQ), generator=torch.Generator().manual_seed(5))
    dec = Decoder(ir, gm, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(dec.step(x[:, :5]), gm(x[:, :5]), rtol=1e-5, atol=1e-5)
        for j in range(5, SEQ):
            torch.testing.assert_close(dec.step(x[:, j:j + 1])[:, -1], gm(x[:, :j + 1])[:, -1], rtol=1e-5, atol=1e-5)


ACT_RTOL = 0.005  # tests/runtime/test_memory.py's
LOSS_BYTES = 8  # the scalar loss and nll_loss's total_weight, which the measurement holds


@dataclass(frozen=True)
class Config:
    name: str
    decl: str
    body: str
    batch: int
    seq: int


BIG = "decoder(vocab=64, dim=64, layers=2, heads=4, kv_heads=2, ffn=96, seq=128)"
MEMORY = [
    Config("nola_qv", BIG, "    adapt m.layers[*].attn.{q,v} with nola(rank=4, bases=32)\n", 4, 128),
    Config("nola_mlp", BIG, "    adapt m.layers[1].mlp.{up,down} with nola(rank=2, bases=16)\n", 4, 128),
    Config("mos_all", BIG, "    adapt m.layers[*].**:linear with mos(rank=4, pool=16, shards=2)\n", 8, 128),
]


def per_step_bytes(ir: IR) -> int:
    """What the per-token model leaves out (see the kinds' docstrings): the assembled B
    (out, r) of each adapter, and its A (r, in) when its input needs a gradient (a
    trainable param upstream of it), kept by autograd for the input's gradient."""
    g = ir.graph
    total = 0
    for n in adapters(ir):
        t = ir.node(n.attrs.target).attrs
        x = ir.inputs(n.id)[0]
        upstream = nx.ancestors(g, x) | {x}
        x_grad = any(p.trainable for u in upstream for p in ir.node(u).params)
        total += 4 * n.attrs.rank * (t.out_features + t.in_features * x_grad)
    return total


@pytest.mark.parametrize("c", MEMORY, ids=lambda c: c.name)
def test_activation_bytes_against_a_measured_step(make_model, c):
    """Measured = estimate + the loss, to the byte (the estimate's per-step part is the
    formula below); and within test_memory.py's tolerance at these token counts."""
    torch.manual_seed(0)
    _, ir, _ = build(make_model, c.body, c.decl)
    gm = to_fx(ir, c.seq)
    with torch.no_grad():
        for p in gm.parameters():
            p.normal_(std=0.02)
    gm = materialize(ir, c.seq, state_of(gm, ir), 0, kernels=COSTED)[0]  # the bases as the kind makes them
    x = torch.randint(0, 64, (c.batch, c.seq))
    y = torch.randint(0, 64, (c.batch, c.seq))
    measured = measure_step(gm, gm.parameters(), warm_adamw(gm, x, y), x, y)
    cost = estimate(ir, c.batch, c.seq)
    assert measured.activations == cost.activation_bytes + LOSS_BYTES
    assert per_step_bytes(ir) == cost.activation_bytes - estimate(ir, 2 * c.batch, c.seq).activation_bytes \
        + cost.activation_bytes  # the per-step part does not grow with the batch
    assert abs(cost.activation_bytes / measured.activations - 1) <= ACT_RTOL
    assert measured.weights == cost.weight_bytes  # generated bases held, tied pools once


# ---------------------------------------------------------------- a real run


RUN = """pipeline nm
model m = decoder(vocab=256, dim=32, layers=2, heads=4, kv_heads=2, ffn=48, seq=16)
data d = text("data.txt", seq=16)
stage tune:
    adapt m.layers[*].attn.{q,v} with nola(rank=2, bases=16, seed=3)
    adapt m.layers[*].attn.{k,o} with mos(rank=2, pool=4, shards=2)
    train m on d (steps=2, batch=2, optimizer=adamw(lr=1e-2))
export m to "apart" (format=effc)
export m to "merged" (format=effc, merge_adapters=true)
"""


def test_a_run_stores_no_bases_and_no_tied_copies_and_its_merge_is_its_model(tmp_path):
    from effc.runtime.run import RunOptions, run_pipeline

    (tmp_path / "data.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    (tmp_path / "p.eff").write_text(RUN)
    r = check_source(RUN, str(tmp_path / "p.eff"))
    assert r.ok, r.diagnostics
    run_pipeline(r, tmp_path / "p.eff", RunOptions(tmp_path / "run"))
    ir, _ = model_ir(r, "m", None)
    snapshot = read_tensors(next((tmp_path / "run" / "stages").glob("*tune/models/m.safetensors")))
    stored = {p.path for p in ir.params() if p.tied_to is None and p.storage != "generated"}
    assert set(snapshot) == stored
    assert set(read_tensors(tmp_path / "apart" / "adapters.safetensors")) == adapter_paths(ir)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    base = lower_model(r.models["m"])
    adapted, fresh = materialize(ir, 16, snapshot, 99, output="logits")  # another seed: the same bases
    assert fresh == []
    merged, fresh = materialize(base, 16, read_tensors(tmp_path / "merged" / "model.safetensors"), 0, output="logits")
    assert fresh == []
    unadapted, _ = materialize(base, 16, snapshot, 0, output="logits")  # the snapshot's base weights alone
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), rtol=1e-5, atol=1e-5)
        assert (adapted(x) - unadapted(x)).abs().max() > 1e-4  # the two steps moved the adapters


# ---------------------------------------------------------------- the checker


def _check(body):
    src = f"pipeline t\nmodel m = {MODEL}\ndata d = markov(seq=8, vocab=2)\nstage s:\n{body}    train m on d (steps=1)\n"
    return check_source(src)


@pytest.mark.parametrize("body,message", [
    ("adapt m.layers[0].attn.q with mos(rank=2, pool=3, shards=2)", "pool=3 is smaller than rank x shards = 4"),
    ("adapt m.layers[0].mlp.down with mos(rank=2, pool=8, shards=3)", "shards=3 does not divide"),
    ("adapt m.layers[0].attn.k with mos(rank=13, pool=16)", "rank=13 exceeds"),
    ("adapt m.layers[0].attn.v with nola(rank=1, bases=19)", "bases=19 trains 38 coefficients"),
    ("adapt m.layers[0].attn.v with nola(rank=13)", "rank=13 exceeds"),
])
def test_the_checker_refuses_what_cannot_work(body, message):
    r = _check(f"    {body}\n")
    assert [d.code for d in r.diagnostics] == ["E0309"] and message in r.diagnostics[0].message
    assert r.diagnostics[0].hint


def test_both_kinds_merge_so_merged_exports_check():
    body = ("    adapt m.layers[*].attn.v with nola(rank=1, bases=18)\n"
            "    adapt m.layers[*].attn.q with mos(rank=2, pool=4)\n")
    src = (f"pipeline t\nmodel m = {MODEL}\ndata d = markov(seq=8, vocab=2)\nstage s:\n{body}"
           "    train m on d (steps=1)\nexport m to \"o\" (format=hf, merge_adapters=true)\n")
    assert check_source(src).ok
