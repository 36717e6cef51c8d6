"""Bottleneck adapters and embedding-row tuning against their papers' formulas written out
here, on a GQA decoder with seeded random adapter values far from their init.

Bottleneck: no weight can express it, so the reference is the base model's fx graph with
the paper's formula inserted after the sublayer's output projection (Houlsby et al. 2019:
y + s · (relu(y D^T + d) U^T + u); He et al. 2022: the same of the sublayer's input h),
written here with torch ops, and LoRA's y + s · x A^T B^T where one shares the weight.
Embedding rows: the table W with W[index] = R (index_put), fed to the base graph with
torch.func.functional_call, so a tied head reads it too. Forward loss and every
gradient compared; also the init, merges (and the refusal to merge), parameter counts
and FLOPs in the cost table (FLOPs against torch's FlopCounterMode), the incremental
decoder, the calibration rule, and what the checker refuses.
"""

import math
import zlib
from collections import Counter
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from effc.compiler.adapters import CannotMerge, adapters_of
from effc.compiler.adapters.embedding_rows import frequent_rows
from effc.compiler.cost import estimate
from effc.compiler.ir import ADAPTERS, IR, Op
from effc.compiler.lower import lower_arch, lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.pipeline import PASSES
from effc.compiler.to_fx import fx_name
from effc.lang.check import AdapterUse, check_source
from effc.lang.tree import Arch
from effc.runtime.generate import Decoder
from effc.runtime.model import materialize, merged_state, state_of
from effc.runtime.run import adapter_args

SEQ = 8
V, D, KV, F, L = 13, 24, 12, 20, 2  # vocab, dim, kv_heads * head_dim, ffn, layers of MODEL
MODEL = f"decoder(vocab={V}, dim={D}, layers={L}, heads=4, kv_heads=2, ffn={F}, seq={SEQ})"
TIED = MODEL[:-1] + ", tied=true)"

# Both modes, both sublayers, a scale, and a LoRA on a projection that a series adapter reads.
BOTTLENECK = ("    adapt m.layers[0] with bottleneck(size=4)\n"
              "    adapt m.layers[1].mlp.down with lora(rank=2, alpha=4)\n"
              "    adapt m.layers[1].{attn,mlp} with bottleneck(size=3, mode=parallel, scale=2.5)\n"
              "    adapt m.layers[1].attn.o with lora(rank=2)\n")
ROWS = [11, 0, 4, 7]  # unsorted on purpose: the index is sorted
EMBEDDING_ROWS = f"    adapt m.embed with embedding_rows(rows={ROWS})\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def build(make_model, body, decl=MODEL):
    info = make_model(decl, body)
    ir, _ = run_passes(lower_model(info), PASSES, PassContext(tuple(info.adapters)), verify_each=True)
    assert IR.from_json(ir.to_json()) == ir
    return info, ir, lower_model(info)


def graph(info, ir, output=None, kernels=None):
    return materialize(ir, SEQ, {}, 0, adapter_args(info, ir), output, kernels)[0]


def randomize(gm, ir, seed=0):
    """Seeded random values for every float param: adapters far from their init (U = 0,
    R = W[index]), norms near 1. The row index is left as it was built."""
    with torch.no_grad():
        for p in ir.params():
            if p.tied_to or p.dtype != "float32":
                continue
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(p.path.encode()))
            r = torch.randn(p.shape, generator=g)
            t = gm.get_parameter(fx_name(p.path))
            t.copy_(1 + 0.3 * r if p.path.endswith("norm.weight") else r / math.sqrt(p.shape[-1]))
    return gm


def tokens(vocab=V):
    """Two rows of 7 tokens: ids in and out of ROWS, some repeated."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 7), generator=g), torch.randint(0, vocab, (2, 7), generator=g)


def nodes(ir, op):
    return [n for n in ir.nodes() if n.op is op]


def compare(gm, reference, inputs, trainable):
    """The adapted graph's output (summed after a fixed random projection when it is not
    a loss) and the gradient of every trainable param against the reference's, which
    computes the same from `trainable` (fx name -> leaf tensor)."""
    def scalar(out):
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return out if out.dim() == 0 else (out * w).sum()
    out = scalar(gm(*inputs))
    out.backward()
    ref = scalar(reference(*inputs))
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    graded = []
    for name, p in gm.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, trainable[name].grad, rtol=1e-4, atol=1e-6)
            graded.append(name)
        else:
            assert p.grad is None, name  # the base and the row index are frozen
    return sorted(graded)


def leaves(gm):
    return {name: p.detach().clone().requires_grad_(p.requires_grad) for name, p in gm.named_parameters()}


# ---------------------------------------------------------------- bottleneck: the reference


def houlsby(y, Dw, d, U, u, s):
    """Houlsby et al. 2019 (fig. 2), scaled as He et al. 2022: y + s · up(relu(down(y)))."""
    return y + s * (torch.relu(y @ Dw.T + d) @ U.T + u)


def parallel_adapter(y, h, Dw, d, U, u, s):
    """He et al. 2022, the scaled parallel adapter: y + s · up(relu(down(h))), h the sublayer's input."""
    return y + s * (torch.relu(h @ Dw.T + d) @ U.T + u)


def lora(y, x, A, B, s):
    return y + s * (x @ A.T) @ B.T


def _linear(g, target):
    """The base graph's matmul of `target`: the F.linear call reading its weight."""
    w = f"{fx_name(target)}.weight"
    return next(n for n in g.nodes if n.op == "call_function" and len(n.args) > 1
                and getattr(n.args[1], "target", None) == w)


def _sublayer_input(target):
    sublayer, _, proj = target.rpartition(".")
    return f"{sublayer}.{ {'o': 'q', 'down': 'up'}[proj] }"


def formula(m, t):
    """One adapter's formula on (y, x, h): the projection's output and input, the sublayer's input."""
    p = fx_name(m.id)
    if m.op is Op.LORA:
        def apply(y, x, h):
            return lora(y, x, t[p + ".A"], t[p + ".B"], m.attrs.scale)
        return apply
    args = (t[p + ".down"], t[p + ".down_bias"], t[p + ".up"], t[p + ".up_bias"], m.attrs.scale)

    def apply(y, x, h):
        return houlsby(y, *args) if m.attrs.mode == "series" else parallel_adapter(y, h, *args)
    return apply


def with_adapters(base_gm, ir, t):
    """The base graph with each adapter's formula inserted after its target's matmul, in
    declaration order, so each reads the output as the earlier ones left it."""
    g = base_gm.graph
    for target in dict.fromkeys(n.attrs.target for n in ir.nodes() if n.op in ADAPTERS):
        out = lin = _linear(g, target)
        h = _linear(g, _sublayer_input(target)).args[0]
        for m in adapters_of(ir, target):
            with g.inserting_after(out):
                new = g.call_function(formula(m, t), (out, lin.args[0], h))
            out.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            out = new
    base_gm.recompile()
    return base_gm


def bottleneck_compare(ir, gm, base_gm, inputs):
    t = leaves(gm)
    with torch.no_grad():
        for name, p in base_gm.named_parameters():
            p.copy_(t[name])
    return compare(gm, with_adapters(base_gm, ir, t), inputs, t)


# ---------------------------------------------------------------- bottleneck


def test_bottleneck_adapts_each_sublayers_output_projection(make_model):
    """`layers[0]` selects both sublayers; the node adapts attn.o / mlp.down; series reads
    nothing, parallel reads the sublayer's input (the norm's output); ports follow
    declaration order across kinds."""
    _, ir, _ = build(make_model, BOTTLENECK)
    got = {n.id: (n.attrs.mode, n.attrs.features, ir.inputs(n.id)) for n in nodes(ir, Op.BOTTLENECK)}
    assert got == {"layers[0].attn.o.bottleneck0": ("series", D, []),
                   "layers[0].mlp.down.bottleneck0": ("series", D, []),
                   "layers[1].attn.o.bottleneck2": ("parallel", D, ["layers[1].attn_norm"]),
                   "layers[1].mlp.down.bottleneck2": ("parallel", D, ["layers[1].mlp_norm"])}
    assert ir.inputs("layers[1].mlp.down") == ["layers[1].mlp.swiglu", "layers[1].mlp.down.lora1",
                                              "layers[1].mlp.down.bottleneck2"]
    assert ir.inputs("layers[1].attn.o") == ["layers[1].attn.core", "layers[1].attn.o.bottleneck2",
                                            "layers[1].attn.o.lora3"]


def test_bottleneck_forward_and_gradients_match_the_formula(make_model):
    info, ir, base = build(make_model, BOTTLENECK)
    gm = randomize(graph(info, ir), ir)
    graded = bottleneck_compare(ir, gm, materialize(base, SEQ, {}, 0)[0], tokens())
    want = [fx_name(n.id) + f".{leaf}" for n in nodes(ir, Op.BOTTLENECK) for leaf in ("down", "down_bias", "up", "up_bias")]
    assert graded == sorted(want + [fx_name(n.id) + f".{leaf}" for n in nodes(ir, Op.LORA) for leaf in "AB"])


def test_a_series_adapter_reads_the_updates_declared_before_it(make_model):
    """LoRA then a series bottleneck on one projection: the adapter reads y + LoRA's update
    (Houlsby's placement on the LoRA-adapted sublayer); the other order adds LoRA's update
    beside the adapter. Each graph is its order's formula, and with the same tensors the
    two differ."""
    lora_stmt = "    adapt m.layers[0].attn.o with lora(rank=2)\n"
    adapter_stmt = "    adapt m.layers[0].attn with bottleneck(size=4)\n"
    x, y = tokens()

    def key(n, p):  # the same tensor in both graphs: the adapters' ids differ by their number
        return (n.op, p.path.rsplit(".", 1)[1]) if n.op in ADAPTERS else p.path
    losses, tensors = [], None
    for body in (lora_stmt + adapter_stmt, adapter_stmt + lora_stmt):
        info, ir, base = build(make_model, body)
        gm = graph(info, ir)
        if tensors is None:
            randomize(gm, ir, seed=4)
            tensors = {key(n, p): gm.get_parameter(fx_name(p.path)).detach().clone()
                       for n in ir.nodes() for p in n.params}
        with torch.no_grad():
            for n in ir.nodes():
                for p in n.params:
                    gm.get_parameter(fx_name(p.path)).copy_(tensors[key(n, p)])
        bottleneck_compare(ir, gm, materialize(base, SEQ, {}, 0)[0], (x, y))
        losses.append(gm(x, y))
    assert not torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-4)


POST_NORM = Arch(vocab=V, dim=D, layers=2, heads=4, kv_heads=4, head_dim=6, ffn=F, seq=SEQ, norm="layer",
                 norm_eps=1e-12, post_norm=True, positions="learned", mlp="gelu", qkv_bias=True, o_bias=True,
                 mlp_bias=True, causal=False, type_vocab=2, embed_norm=True, final_norm=False, output="embedding")


def test_bottleneck_on_a_post_norm_encoder():
    """BERT's blocks normalise after the residual add: the adapter acts on the sublayer's
    output before it (series), or reads the sublayer's input, the residual stream
    (parallel); the graph's output is the mean-pooled embedding."""
    series = AdapterUse("bottleneck", "shared", frozenset({"layers[0].attn", "layers[1].mlp"}), None,
                        {"size": 4, "mode": "series", "scale": 1.0})
    par = AdapterUse("bottleneck", "shared", frozenset({"layers[0].mlp", "layers[1].attn"}), None,
                     {"size": 5, "mode": "parallel", "scale": 0.5})
    base = lower_arch(POST_NORM, None)
    ir, _ = run_passes(base, PASSES, PassContext((series, par)), verify_each=True)
    assert ir.inputs("layers[1].attn.o.bottleneck1") == ["layers[0].mlp_norm"]  # the block's input
    assert ir.outputs("layers[1].attn.o") == ["layers[1].attn_residual"]
    gm = randomize(materialize(ir, SEQ, {}, 0)[0], ir)
    x, _ = tokens()
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[1, 5:] = False  # a padded row
    graded = bottleneck_compare(ir, gm, materialize(base, SEQ, {}, 0)[0], (x, keep))
    assert len(graded) == 4 * 4


def test_bottleneck_starts_as_the_base_model_and_cannot_merge(make_model):
    info, ir, base = build(make_model, BOTTLENECK.replace("lora(rank=2, alpha=4)", "lora(rank=2)"))
    gm = graph(info, ir, "logits")
    s = state_of(gm, ir)
    for n in nodes(ir, Op.BOTTLENECK):
        bound = 1 / math.sqrt(n.attrs.features)  # nn.Linear's default init, fan-in f
        for leaf in ("down", "down_bias"):
            t = s[f"{n.id}.{leaf}"]
            assert t.abs().max() <= bound and t.std() > bound / 4
        assert not s[f"{n.id}.up"].any() and not s[f"{n.id}.up_bias"].any()
    x, _ = tokens()
    assert torch.equal(gm(x), materialize(base, SEQ, {}, 0, output="logits")[0](x))
    with pytest.raises(CannotMerge, match="nonlinear"):
        merged_state(ir, s)


# ---------------------------------------------------------------- embedding rows


def rows_table(W, index, R):
    """Yuan et al. 2024: the embedding with only the chosen rows trained, W[index] = R."""
    return W.index_put((index,), R)


@pytest.mark.parametrize("decl", [MODEL, TIED], ids=["untied", "tied"])
def test_rows_forward_and_gradients_match_the_formula(make_model, decl):
    """The table W with W[index] = R fed to the base graph (a tied head reads that table
    too). R's gradient is then the lookup's scatter of the output gradient over the
    tokens that hit each row, plus, tied, the head's gradient of those rows."""
    info, ir, base = build(make_model, EMBEDDING_ROWS, decl)
    gm = randomize(graph(info, ir), ir)
    (node,) = [n for n in nodes(ir, Op.EMBEDDING_ROWS) if n.attrs.part == "embedding"]
    t = leaves(gm)
    p = fx_name(node.id)
    assert t[p + ".index"].tolist() == sorted(ROWS)
    base_gm = materialize(base, SEQ, {}, 0)[0]
    params = {name: t[name] for name, _ in base_gm.named_parameters()}
    params["embed.weight"] = rows_table(t["embed.weight"], t[p + ".index"], t[p + ".rows"])

    def reference(x, y):
        return functional_call(base_gm, params, (x, y))
    x, y = tokens()
    assert set(x.flatten().tolist()) & set(ROWS) and set(x.flatten().tolist()) - set(ROWS)
    assert compare(gm, reference, (x, y), t) == [p + ".rows"]
    heads = [n for n in nodes(ir, Op.EMBEDDING_ROWS) if n.attrs.part == "head"]
    assert [n.attrs.target for n in heads] == (["head"] if decl == TIED else [])


@pytest.mark.parametrize("decl", [MODEL, TIED], ids=["untied", "tied"])
def test_rows_start_as_the_base_model_and_merge_exactly(make_model, decl):
    info, ir, base = build(make_model, EMBEDDING_ROWS, decl)
    gm = graph(info, ir, "logits")
    s = state_of(gm, ir)
    assert torch.equal(s["embed.embedding_rows0.rows"], s["embed.weight"][sorted(ROWS)])  # R = W[index]
    x, _ = tokens()
    assert torch.equal(gm(x), materialize(base, SEQ, {}, 0, output="logits")[0](x))
    randomize(gm, ir, seed=2)
    s = state_of(gm, ir)
    merged = merged_state(ir, s)
    want = s["embed.weight"].clone()
    want[sorted(ROWS)] = s["embed.embedding_rows0.rows"]
    assert torch.equal(merged["embed.weight"], want)  # a copy: exact
    assert "head.weight" not in merged if decl == TIED else "head.weight" in merged  # still tied
    merged_gm, fresh = materialize(base, SEQ, merged, 0, output="logits")
    assert fresh == []
    torch.testing.assert_close(merged_gm(x), gm(x), rtol=1e-5, atol=1e-5)


def test_calibration_chooses_the_most_frequent_ids_ties_to_the_smaller():
    ids = torch.tensor([5, 3, 5, 9, 3, 1, 9, 9, 0, 3, 7, 7, 12])  # ties at 3, 2 and 1 occurrences
    counts = Counter(ids.tolist())
    for n in range(1, V + 1):  # ids the data never holds come last, smaller first
        ranked = sorted(range(V), key=lambda i: (-counts[i], i))
        assert frequent_rows(ids, V, n) == sorted(ranked[:n])


# ---------------------------------------------------------------- cost


def _measured_flops(gm, x, y) -> int:
    with FlopCounterMode(display=False) as fc:
        gm(x, y).backward()
    return fc.get_total_flops()


def test_parameter_counts_and_flops_in_the_cost_table(make_model):
    """Parameter counts from the shapes; the training FLOPs against torch's count of a real
    forward and backward, relative to a base graph with the same gradient flow (the
    estimate's other terms, attention's PaLM convention, are then the same): its first
    adapted op trainable for the bottleneck, the table for the rows."""
    x, y = tokens()
    _, _, base = build(make_model, "")
    b = estimate(base, *x.shape)

    def gap(info, ir):
        # the reference graph: FlopCounterMode counts torch's ops, not effc's fused kernels
        gm = graph(info, ir, kernels="none") if info else materialize(ir, SEQ, {}, 0, kernels="none")[0]
        return _measured_flops(gm, x, y) - estimate(ir, *x.shape).flops_train_per_token * x.numel()

    info, ir, _ = build(make_model, BOTTLENECK.replace("    adapt m.layers[1].attn.o with lora(rank=2)\n", ""))
    c = estimate(ir, *x.shape)
    sizes = [4, 4, 3, 3]
    bottleneck = sum(2 * s * D + s + D for s in sizes)  # D (s, dim), d (s,), U (dim, s), u (dim,)
    lora = 2 * (F + D)
    assert c.params_trainable == dict(c.params_by_role)["adapter"] == bottleneck + lora
    assert c.params_total == b.params_total + bottleneck + lora
    assert c.flops_forward_per_token - b.flops_forward_per_token == 2 * sum(2 * s * D for s in sizes) + 2 * lora
    reference, _ = base.map_params(lambda p: replace(p, trainable=p.path == "layers[0].attn.o.weight"))
    assert gap(info, ir) == gap(None, reference)

    for decl in (MODEL, TIED):
        info, ir, base = build(make_model, EMBEDDING_ROWS, decl)
        c, b = estimate(ir, *x.shape), estimate(base, *x.shape)
        n = len(ROWS)
        assert c.params_trainable == n * D and c.optimizer_bytes == 2 * 4 * n * D
        assert c.params_total == b.params_total + n * D + n  # R, and the stored index
        assert c.weight_bytes == b.weight_bytes + 4 * n * D + 8 * n
        head = 2 * n * D if decl == TIED else 0  # h (R - W[index])^T into the tied head's columns
        assert c.flops_forward_per_token - b.flops_forward_per_token == head
        # The reference trains the table; tied, torch also counts the head's weight gradient
        # (2 V D a token), which the reference's frozen head record leaves out of its estimate.
        reference, _ = base.map_params(lambda p: replace(p, trainable=p.path == "embed.weight"))
        assert gap(info, ir) == gap(None, reference) - 2 * V * D * x.numel() * (decl == TIED), decl


# ---------------------------------------------------------------- generation


def test_the_incremental_decoder_gives_the_graphs_logits(make_model):
    """The KV-cache decoder evaluates both kinds through the same functions with its eager
    builder: the prompt's logits are the graph's, and each cached step is the graph's last
    row on the grown sequence (the tied head reading the trained rows throughout)."""
    info, ir, _ = build(make_model, BOTTLENECK + EMBEDDING_ROWS.replace(str(ROWS), "[1, 2, 5, 9]"), TIED)
    gm = randomize(graph(info, ir, "logits"), ir, seed=3).eval()
    x = torch.randint(0, V, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = gm(x)
    dec = Decoder(ir, gm, SEQ)
    torch.testing.assert_close(dec.step(x[:, :4]), want[:, :4], atol=1e-5, rtol=1e-5)
    for j in range(4, SEQ):
        with torch.no_grad():
            full = gm(x[:, :j + 1])[:, -1]
        torch.testing.assert_close(dec.step(x[:, j:j + 1])[:, -1], full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the checker


def check(body, export="", decl=MODEL):
    src = (f"pipeline t\nmodel m = {decl}\ndata d = markov(seq=8, vocab={V})\nstage s:\n{body}"
           f"    train m on d (steps=1)\n{export}")
    return check_source(src)


def codes(result):
    return [d.code for d in result.diagnostics]


def test_a_bottleneck_is_never_merged_and_rows_are():
    for export in ('export m to "out/x" (format=effc, merge_adapters=true)\n',
                   'export m to "out/x" (format=hf, merge_adapters=true)\n'):
        r = check("    adapt m.layers[*].mlp with bottleneck(size=4)\n", export)
        assert codes(r) == ["E0409"] and "nonlinear" in r.diagnostics[0].message
        assert check(EMBEDDING_ROWS, export, TIED).ok
    assert check("    adapt m.layers[*].mlp with bottleneck(size=4)\n", 'export m to "out/x" (format=effc)\n').ok


@pytest.mark.parametrize("args,message", [
    ("rows=[1, 2], count=2, calibrate=d", "not both"),
    ("count=3", "count=3 needs calibrate=DATA"),
    ("calibrate=d", "calibrate= needs count=N"),
    ("", "needs the rows that train"),
    ("rows=[]", "lists no row"),
    ("rows=[1, 2, 1]", "token id 1 twice"),
    (f"rows=[0, {V}]", f"outside the vocabulary of {V}"),
    (f"count={V + 1}, calibrate=d", f"exceeds the vocabulary of {V}"),
])
def test_embedding_rows_arguments_the_checker_refuses(args, message):
    r = check(f"    adapt m.embed with embedding_rows({args})\n")
    assert codes(r) == ["E0309"] and message in r.diagnostics[0].message, r.diagnostics


def test_embedding_rows_adapts_the_token_embedding_only():
    r = check("    adapt m.layers[0].attn.q with embedding_rows(rows=[1])\n")
    assert codes(r) == ["E0206"]
    assert check("    adapt m with embedding_rows(count=4, calibrate=d)\n").ok  # the model: its one table


def test_a_bottleneck_shares_its_output_projection_with_exclusive_adapters():
    """A bottleneck on layers[0].attn changes attn.o: an IA3 there is E0209, in either order."""
    from effc.lang.check import check_source

    def codes(body):
        src = (f"pipeline t\nmodel m = {MODEL}\ndata d = markov(seq=8, vocab=13)\nstage s:\n{body}"
               "    train m on d (steps=1)\n")
        return [d.code for d in check_source(src).diagnostics]

    bottle, ia3 = "    adapt m.layers[0].attn with bottleneck(size=4)\n", "    adapt m.layers[0].attn.o with ia3()\n"
    assert codes(bottle + ia3) == codes(ia3 + bottle) == ["E0209"]
    assert codes(bottle + "    adapt m.layers[0].attn.q with ia3()\n") == []
