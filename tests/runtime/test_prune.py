"""effc.runtime.prune against independent references: masks written out by hand for small
weights, exact counts and N:M structure on random ones, Wanda's score against its formula
and an explicit loop over rows, and structured pruning against the model it must equal:
a small attention (MHA and GQA, causal or not) and MLP (SwiGLU and GELU) written here in
plain torch, run with the shrunk tensors and with the full tensors whose pruned heads or
channels are zeroed where they reach the residual stream."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effc.runtime.prune import (
    ActivationNorms,
    HeadNorms,
    SublayerSimilarity,
    channel_scores,
    choose_drop,
    choose_keep,
    head_scores,
    magnitude_masks,
    nm_mask,
    prune_channels,
    prune_heads,
    wanda_mask,
    wanda_nm_mask,
    wanda_scores,
)

pytestmark = pytest.mark.usefixtures("one_thread")

K, D = True, False  # kept, dropped


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------- magnitude


W24 = torch.tensor([[0.5, -0.1, 0.3, -0.8],
                    [0.2, 0.0, -0.6, 0.1]])


def test_magnitude_by_hand():
    # |w| ascending: 0.0 (flat 5), 0.1 (flat 1), 0.1 (flat 7), 0.2 (flat 4), 0.3, ...
    half = magnitude_masks({"w": W24}, 0.5)["w"]
    assert half.tolist() == [[K, D, K, K], [D, D, K, D]]
    # two go: 0.0, then of the two 0.1s the lower flat index (1) goes, flat 7 stays
    quarter = magnitude_masks({"w": W24}, 0.25)["w"]
    assert quarter.tolist() == [[K, D, K, K], [K, D, K, K]]
    assert magnitude_masks({"w": W24}, 0.0)["w"].all()
    assert not magnitude_masks({"w": W24}, 1.0)["w"].any()


def test_magnitude_global_by_hand():
    a = torch.tensor([[10.0, -40.0]])
    b = torch.tensor([[3.0, 0.5], [5.0, -6.0]])
    # global, 3 of 6 go: 0.5, 3, 5, all in b
    glob = magnitude_masks({"a": a, "b": b}, 0.5, scope="global")
    assert glob["a"].tolist() == [[K, K]]
    assert glob["b"].tolist() == [[D, D], [D, K]]
    # per tensor, half of each
    per = magnitude_masks({"a": a, "b": b}, 0.5, scope="tensor")
    assert per["a"].tolist() == [[D, K]]
    assert per["b"].tolist() == [[D, D], [K, K]]
    # a tie across tensors goes to the earlier one in the dict
    tie = magnitude_masks({"x": torch.ones(1, 1), "y": torch.ones(1, 1)}, 0.5, scope="global")
    assert tie["x"].tolist() == [[D]] and tie["y"].tolist() == [[K]]


@pytest.mark.parametrize("sparsity", [0.1, 0.33, 0.5, 0.7, 0.95])
def test_magnitude_counts_exact(sparsity):
    # rounded weights: many ties, the count must still be exact
    weights = {"a": (_randn(7, 13, seed=1) * 3).round(), "b": (_randn(5, 16, seed=2) * 3).round(),
               "c": _randn(3, 3, seed=3)}
    per = magnitude_masks(weights, sparsity)
    for path, w in weights.items():
        mask = per[path]
        assert mask.shape == w.shape and mask.dtype == torch.bool
        assert (~mask).sum().item() == math.floor(sparsity * w.numel())
        if (~mask).any() and mask.any():
            assert w[~mask].abs().max() <= w[mask].abs().min()
    glob = magnitude_masks(weights, sparsity, scope="global")
    total = sum(w.numel() for w in weights.values())
    assert sum((~m).sum().item() for m in glob.values()) == math.floor(sparsity * total)
    removed = torch.cat([w[~glob[p]].abs() for p, w in weights.items()])
    kept = torch.cat([w[glob[p]].abs() for p, w in weights.items()])
    assert removed.max() <= kept.min()


def test_magnitude_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_masks({"w": W24}, 1.5)
    with pytest.raises(ValueError, match="scope"):
        magnitude_masks({"w": W24}, 0.5, scope="layer")


# ---------------------------------------------------------------------------- N:M


def test_nm_by_hand():
    score = torch.tensor([[1.0, 5.0, 3.0, 2.0, 8.0, 7.0, 6.0, 9.0],
                          [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0],   # ties: the lower columns stay
                          [4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]])
    assert nm_mask(score, 2, 4).tolist() == [[D, K, K, D, K, D, D, K],
                                             [K, K, D, D, K, K, D, D],
                                             [K, K, D, D, D, D, K, K]]
    assert nm_mask(score, 1, 4).tolist() == [[D, K, D, D, D, D, D, K],
                                             [K, D, D, D, K, D, D, D],
                                             [K, D, D, D, D, D, D, K]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8), (1, 2)])
def test_nm_structure_on_every_group(n, m):
    score = (_randn(6, 32, seed=4) * 2).round()  # ties included
    mask = nm_mask(score, n, m)
    for row in range(6):
        for g in range(0, 32, m):
            kept, s = mask[row, g:g + m], score[row, g:g + m]
            assert kept.sum().item() == n
            if n < m:
                assert s[kept].min() >= s[~kept].max()


def test_nm_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.zeros(2, 6), 2, 4)
    with pytest.raises(ValueError):
        nm_mask(torch.zeros(2, 8), 5, 4)


# ---------------------------------------------------------------------------- Wanda


def test_activation_norms_over_batches_and_mask():
    x1, x2 = _randn(2, 3, 4, seed=5), _randn(5, 4, seed=6)
    acc = ActivationNorms()
    acc.update(x1)
    acc.update(x2)
    expected = torch.cat([x1.reshape(-1, 4), x2]).norm(dim=0)
    torch.testing.assert_close(acc.result(), expected.float())
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    masked = ActivationNorms()
    masked.update(x1, mask)
    torch.testing.assert_close(masked.result(), x1[mask].norm(dim=0).float())
    with pytest.raises(ValueError):
        ActivationNorms().result()


def test_wanda_scores_formula_and_loop():
    w, norm = _randn(5, 7, seed=7), _randn(7, seed=8).abs()
    score = wanda_scores(w, norm)
    torch.testing.assert_close(score, w.abs() * norm[None, :])
    for i in range(5):
        for j in range(7):
            assert score[i, j].item() == pytest.approx(abs(w[i, j].item()) * norm[j].item())


def test_wanda_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [4.0, 3.0, 2.0, 1.0]])
    norm = torch.tensor([4.0, 1.0, 1.0, 0.5])
    # scores: row 0 [4, 2, 3, 2], row 1 [16, 3, 2, 0.5]
    expected = [[K, D, K, D], [K, K, D, D]]
    assert wanda_mask(w, norm, 0.5).tolist() == expected
    assert wanda_nm_mask(w, norm, 2, 4).tolist() == expected
    # magnitude alone would keep the other half of row 0
    assert magnitude_masks({"w": w[:1]}, 0.5)["w"].tolist() == [[D, D, K, K]]


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_wanda_mask_against_a_loop_over_rows(sparsity):
    w, norm = (_randn(6, 10, seed=9) * 2).round(), torch.tensor([1.0, 2.0] * 5)  # ties included
    mask = wanda_mask(w, norm, sparsity)
    k = math.floor(sparsity * 10)
    for i in range(6):
        scores = [abs(w[i, j].item()) * norm[j].item() for j in range(10)]
        removed = sorted(range(10), key=lambda j: (scores[j], j))[:k]
        assert mask[i].tolist() == [j not in removed for j in range(10)]


def test_wanda_nm_is_nm_of_scores():
    w, norm = _randn(4, 16, seed=10), _randn(16, seed=11).abs()
    assert torch.equal(wanda_nm_mask(w, norm, 2, 4), nm_mask(w.abs() * norm[None, :], 2, 4))
    with pytest.raises(ValueError):
        wanda_scores(w, norm[:8])


# ---------------------------------------------------------------------------- attention heads


def attention(x, t, heads, kv_heads, hd, causal):
    """Plain multi-head attention with grouped kv heads: query head h reads kv head
    h // (heads // kv_heads)."""
    b, s, _ = x.shape
    q = F.linear(x, t["q.weight"], t.get("q.bias")).view(b, s, heads, hd).transpose(1, 2)
    k = F.linear(x, t["k.weight"], t.get("k.bias")).view(b, s, kv_heads, hd).transpose(1, 2)
    v = F.linear(x, t["v.weight"], t.get("v.bias")).view(b, s, kv_heads, hd).transpose(1, 2)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    logits = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if causal:
        logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    z = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * hd)
    return z, F.linear(z, t["o.weight"], t.get("o.bias"))


def _attention_tensors(heads, kv_heads, hd, dim, seed):
    shapes = {"q.weight": (heads * hd, dim), "k.weight": (kv_heads * hd, dim), "v.weight": (kv_heads * hd, dim),
              "o.weight": (dim, heads * hd), "q.bias": (heads * hd,), "k.bias": (kv_heads * hd,),
              "v.bias": (kv_heads * hd,), "o.bias": (dim,)}
    return {leaf: _randn(*shape, seed=seed + i) for i, (leaf, shape) in enumerate(shapes.items())}


@pytest.mark.parametrize("heads,kv_heads,keep", [(4, 4, [0, 2]), (4, 4, [3]), (6, 2, [1]), (8, 4, [0, 1, 3]),
                                                 (4, 1, [0])])
@pytest.mark.parametrize("causal", [True, False])
def test_prune_heads_equals_zeroed_heads(heads, kv_heads, keep, causal):
    hd, dim = 3, 10
    t = _attention_tensors(heads, kv_heads, hd, dim, seed=20)
    x = _randn(2, 5, dim, seed=30)
    per = heads // kv_heads
    zeroed = dict(t, **{"o.weight": t["o.weight"].clone()})
    for h in range(heads):
        if h // per not in keep:
            zeroed["o.weight"][:, h * hd:(h + 1) * hd] = 0
    small = prune_heads(t, heads, kv_heads, hd, keep)
    assert set(small) == set(t)
    assert small["q.weight"].shape == (len(keep) * per * hd, dim)
    assert small["k.weight"].shape == small["v.weight"].shape == (len(keep) * hd, dim)
    assert small["o.weight"].shape == (dim, len(keep) * per * hd)
    _, expected = attention(x, zeroed, heads, kv_heads, hd, causal)
    _, got = attention(x, small, len(keep) * per, len(keep), hd, causal)
    torch.testing.assert_close(got, expected)


def _head_rows(h, hd):
    return slice(h * hd, (h + 1) * hd)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_head_scores_against_a_loop(heads, kv_heads):
    hd, dim = 2, 6
    t = _attention_tensors(heads, kv_heads, hd, dim, seed=40)
    q, k, v, o = (t[f"{n}.weight"] for n in "qkvo")
    per = heads // kv_heads
    magnitude = head_scores(q, k, v, o, heads, kv_heads, hd)
    out_norm = _randn(heads, seed=50).abs()
    calibrated = head_scores(q, k, v, o, heads, kv_heads, hd, head_out_norm=out_norm)
    assert magnitude.shape == calibrated.shape == (kv_heads,)
    for g in range(kv_heads):
        qs = range(g * per, (g + 1) * per)
        expected = (sum((q[_head_rows(h, hd)] ** 2).sum() + (o[:, _head_rows(h, hd)] ** 2).sum() for h in qs)
                    + (k[_head_rows(g, hd)] ** 2).sum() + (v[_head_rows(g, hd)] ** 2).sum())
        assert magnitude[g].item() == pytest.approx(expected.item(), rel=1e-5)
        expected = sum(out_norm[h] * torch.linalg.matrix_norm(o[:, _head_rows(h, hd)]) for h in qs)
        assert calibrated[g].item() == pytest.approx(expected.item(), rel=1e-5)


def test_head_norms_are_mean_output_norms():
    heads, hd = 4, 3
    t = _attention_tensors(heads, 2, hd, 8, seed=60)
    x = _randn(2, 5, 8, seed=61)
    z, _ = attention(x, t, heads, 2, hd, causal=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    acc = HeadNorms(heads)
    acc.update(z[:1])
    acc.update(z[1:], mask[1:])
    tokens = z[mask]  # (8, heads * hd)
    expected = torch.stack([tokens[:, _head_rows(h, hd)].norm(dim=1).mean() for h in range(heads)])
    torch.testing.assert_close(acc.result(), expected.float())


def test_choose_keep():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0])
    assert choose_keep(scores, 2) == [0, 2]
    assert choose_keep(scores, 1) == [0, 1, 2]  # of the tied 1.0s the lower index stays
    assert choose_keep(scores, 0) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        choose_keep(scores, 4)


def test_prune_heads_rejects_bad_input():
    t = _attention_tensors(4, 2, 2, 6, seed=70)
    with pytest.raises(ValueError, match="ascending"):
        prune_heads(t, 4, 2, 2, [1, 0])
    with pytest.raises(ValueError, match="ascending"):
        prune_heads(t, 4, 2, 2, [2])
    with pytest.raises(ValueError, match="shape"):
        prune_heads(t, 4, 4, 2, [0])
    with pytest.raises(ValueError, match="q_norm"):
        prune_heads(dict(t, **{"q_norm.weight": torch.ones(2)}), 4, 2, 2, [0])
    with pytest.raises(ValueError, match="o.weight"):
        prune_heads({k: v for k, v in t.items() if k != "o.weight"}, 4, 2, 2, [0])


# ---------------------------------------------------------------------------- MLP channels


def swiglu(x, t):
    h = F.silu(F.linear(x, t["gate.weight"])) * F.linear(x, t["up.weight"])
    return h, F.linear(h, t["down.weight"])


def gelu_mlp(x, t):
    h = F.gelu(F.linear(x, t["up.weight"], t["up.bias"]))
    return h, F.linear(h, t["down.weight"], t["down.bias"])


MLPS = {"swiglu": (swiglu, {"gate.weight": (12, 5), "up.weight": (12, 5), "down.weight": (5, 12)}),
        "gelu": (gelu_mlp, {"up.weight": (12, 5), "up.bias": (12,), "down.weight": (5, 12), "down.bias": (5,)})}


@pytest.mark.parametrize("kind", list(MLPS))
@pytest.mark.parametrize("keep", [[0, 3, 4, 11], [7], list(range(12))])
def test_prune_channels_equals_zeroed_channels(kind, keep):
    mlp, shapes = MLPS[kind]
    t = {leaf: _randn(*shape, seed=80 + i) for i, (leaf, shape) in enumerate(shapes.items())}
    x = _randn(3, 4, 5, seed=90)
    zeroed = dict(t, **{"down.weight": t["down.weight"].clone()})
    zeroed["down.weight"][:, [c for c in range(12) if c not in keep]] = 0
    small = prune_channels(t, keep)
    assert set(small) == set(t) and small["up.weight"].shape == (len(keep), 5)
    assert small["down.weight"].shape == (5, len(keep))
    torch.testing.assert_close(mlp(x, small)[1], mlp(x, zeroed)[1])


def test_channel_scores_by_hand():
    up = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])   # row norms 5, 1, 2
    gate = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])  # row norms 1, 2, 2
    down = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 4.0]])    # column norms 1, 2, 5
    swiglu_t = {"gate.weight": gate, "up.weight": up, "down.weight": down}
    gelu_t = {"up.weight": up, "up.bias": torch.zeros(3), "down.weight": down, "down.bias": torch.zeros(2)}
    assert channel_scores(swiglu_t).tolist() == pytest.approx([5.0, 4.0, 20.0])  # 1*1*5, 2*2*1, 5*2*2
    assert channel_scores(gelu_t).tolist() == pytest.approx([5.0, 2.0, 10.0])    # 1*5, 2*1, 5*2
    act = torch.tensor([1.0, 3.0, 0.5])
    assert channel_scores(swiglu_t, act).tolist() == pytest.approx([1.0, 6.0, 2.5])
    assert channel_scores(gelu_t, act).tolist() == pytest.approx([1.0, 6.0, 2.5])


def test_channel_scores_with_calibrated_norms():
    mlp, shapes = MLPS["swiglu"]
    t = {leaf: _randn(*shape, seed=100 + i) for i, (leaf, shape) in enumerate(shapes.items())}
    h, _ = mlp(_randn(2, 6, 5, seed=110), t)
    acc = ActivationNorms()
    acc.update(h)
    scores = channel_scores(t, acc.result())
    expected = [h[..., c].norm().item() * t["down.weight"][:, c].norm().item() for c in range(12)]
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="inconsistent"):
        channel_scores(dict(t, **{"down.weight": torch.zeros(5, 11)}))
    with pytest.raises(ValueError, match="ascending"):
        prune_channels(t, [])


# ---------------------------------------------------------------------------- sublayers


def test_sublayer_similarity_against_cosine_similarity():
    x_in = [_randn(2, 5, 8, seed=120), _randn(3, 4, 8, seed=121)]
    x_out = [x + 0.7 * _randn(*x.shape, seed=130 + i) for i, x in enumerate(x_in)]
    masks = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)]
    masks[1][2, 1:] = False
    acc, plain = SublayerSimilarity(), SublayerSimilarity()
    for a, b, m in zip(x_in, x_out, masks):
        acc.update(a, b, m)
        plain.update(a, b)
    cos = [F.cosine_similarity(a, b, dim=-1) for a, b in zip(x_in, x_out)]
    real = torch.cat([c[m] for c, m in zip(cos, masks)])  # 8 + 9 real tokens
    assert real.numel() == 17
    assert acc.result() == pytest.approx(real.sum().item() / 17)
    everything = torch.cat([c.flatten() for c in cos])
    assert plain.result() == pytest.approx(everything.sum().item() / everything.numel())
    same = SublayerSimilarity()
    same.update(x_in[0], 2 * x_in[0])  # a sublayer that only rescales the stream
    assert same.result() == pytest.approx(1.0)


def test_choose_drop():
    sims = {"layers[0].attn": 0.9, "layers[0].mlp": 0.5, "layers[1].attn": 0.95, "layers[1].mlp": 0.9}
    assert choose_drop(sims, 1) == ["layers[1].attn"]
    assert choose_drop(sims, 2) == ["layers[1].attn", "layers[0].attn"]  # tie at 0.9: the earlier one
    assert choose_drop(sims, 3) == ["layers[1].attn", "layers[0].attn", "layers[1].mlp"]
    assert choose_drop(sims, 0) == []
    with pytest.raises(ValueError):
        choose_drop(sims, 5)
