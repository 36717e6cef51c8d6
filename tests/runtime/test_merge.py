"""effc.runtime.merge: linear, task arithmetic and TIES against results computed by hand on
small tensors (the steps written out in comments), DARE against what it must be in
expectation and exactly at drop=0, its reproducibility whatever the dict order, and the
MergeError cases."""

from __future__ import annotations

import pytest
import torch

from effc.runtime.merge import MergeError, dare, linear, task_arithmetic, ties

pytestmark = pytest.mark.usefixtures("one_thread")


def _t(*rows):
    """A float32 tensor of the given rows: (len(rows), len(row))."""
    return torch.tensor(rows, dtype=torch.float32)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- linear, task arithmetic


def test_linear_by_hand():
    idx = torch.tensor([3, 1])
    a = {"w": _t([1.0, 2.0]), "idx": idx}
    b = {"w": _t([3.0, -2.0]), "idx": idx.clone()}
    torch.testing.assert_close(linear([a, b])["w"], _t([2.0, 0.0]))
    # (1*1 + 3*3) / 4, (1*2 + 3*-2) / 4
    torch.testing.assert_close(linear([a, b], weights=[1, 3])["w"], _t([2.5, -1.0]))
    torch.testing.assert_close(linear([a, b], weights=[1, 3], normalize=False)["w"], _t([10.0, -4.0]))
    out = linear([a, b])
    assert torch.equal(out["idx"], idx) and out["idx"].dtype == torch.int64 and out["idx"] is not idx
    assert list(out) == ["w", "idx"]


def test_task_arithmetic_by_hand():
    base = {"w": _t([0.0, 1.0, 2.0])}
    a = {"w": _t([1.0, 1.0, 4.0])}   # tau_a = [1, 0, 2]
    b = {"w": _t([-1.0, 3.0, 2.0])}  # tau_b = [-1, 2, 0]
    # base + 0.5 * [0, 2, 2]
    torch.testing.assert_close(task_arithmetic([a, b], base, scale=0.5)["w"], _t([0.0, 2.0, 3.0]))
    # base + 0.5 * (2 * tau_a + tau_b) = base + 0.5 * [1, 2, 4]
    torch.testing.assert_close(task_arithmetic([a, b], base, scale=0.5, weights=[2, 1])["w"], _t([0.5, 2.0, 4.0]))
    # one model at scale 1 is that model
    torch.testing.assert_close(task_arithmetic([a], base)["w"], a["w"])


# ---------------------------------------------------------------------------- TIES


BASE = {"w": _t([1.0, 1.0, 1.0, 1.0])}
TAUS = [_t([0.5, -2.0, 1.0, 0.1]),
        _t([-1.5, 0.5, 3.0, -0.2]),
        _t([2.0, -0.4, -0.3, 0.6])]
MODELS = [{"w": BASE["w"] + tau} for tau in TAUS]


def test_ties_by_hand():
    # density 0.5 of 4 entries: each task vector keeps its 2 largest |entries|
    #   trimmed 1: [ 0.0, -2.0, 1.0, 0.0]
    #   trimmed 2: [-1.5,  0.0, 3.0, 0.0]
    #   trimmed 3: [ 2.0,  0.0, 0.0, 0.6]
    # sum [0.5, -2.0, 4.0, 0.6] -> elected signs [+, -, +, +]
    # disjoint means: [2.0 (only 3 agrees), -2.0, (1 + 3) / 2 = 2.0, 0.6]
    out = ties(MODELS, BASE, density=0.5)
    torch.testing.assert_close(out["w"], BASE["w"] + _t([2.0, -2.0, 2.0, 0.6]))
    torch.testing.assert_close(ties(MODELS, BASE, density=0.5, scale=0.5)["w"], BASE["w"] + _t([1.0, -1.0, 1.0, 0.3]))


def test_ties_weighted_by_hand():
    # weights [1, 3, 1] on the trimmed vectors above:
    #   [0, -2, 1, 0] + [-4.5, 0, 9, 0] + [2, 0, 0, 0.6] = [-2.5, -2, 10, 0.6] -> signs [-, -, +, +]
    # weighted means of the agreeing ones: [-1.5 (only 2), -2.0, (1*1 + 3*3) / 4 = 2.5, 0.6]
    out = ties(MODELS, BASE, density=0.5, weights=[1, 3, 1])
    torch.testing.assert_close(out["w"], BASE["w"] + _t([-1.5, -2.0, 2.5, 0.6]))
    with pytest.raises(MergeError, match="positive"):
        ties(MODELS, BASE, density=0.5, weights=[1, 0, 1])


def test_ties_where_nothing_agrees_stays_base():
    base = {"w": _t([2.0, 2.0, 2.0])}
    a = {"w": _t([3.0, 2.0, 5.0])}  # tau [ 1, 0, 3]
    b = {"w": _t([1.0, 2.0, 1.0])}  # tau [-1, 0, -1]
    # density 1 keeps everything; sums [0, 0, 2]: no elected sign in the first two entries
    # third: + elected, only a agrees -> 3
    torch.testing.assert_close(ties([a, b], base, density=1.0)["w"], _t([2.0, 2.0, 5.0]))
    # density 0 trims every task vector to nothing
    torch.testing.assert_close(ties([a, b], base, density=0.0)["w"], base["w"])


def test_ties_rounds_half_up_per_tensor():
    base = {"w": torch.zeros(1, 5), "v": torch.zeros(2, 2)}
    a = {"w": _t([5.0, -4.0, 3.0, 2.0, 1.0]), "v": _t([1.0, 1.0], [-1.0, 1.0])}
    # 0.5 * 5 = 2.5 -> 3 entries stay; in v, 0.5 * 4 = 2 of four equal |tau|: the first two by flat index
    out = ties([a], base, density=0.5)
    torch.testing.assert_close(out["w"], _t([5.0, -4.0, 3.0, 0.0, 0.0]))
    torch.testing.assert_close(out["v"], _t([1.0, 1.0], [0.0, 0.0]))


def test_ties_random_against_a_loop():
    base = {"w": _randn(3, 5, seed=1)}
    models = [{"w": base["w"] + _randn(3, 5, seed=2 + i)} for i in range(3)]
    out = ties(models, base, density=0.4)["w"]
    k = round(0.4 * 15)
    trimmed = []
    for m in models:
        tau = (m["w"] - base["w"]).flatten().tolist()
        top = sorted(range(15), key=lambda j: -abs(tau[j]))[:k]
        trimmed.append([tau[j] if j in top else 0.0 for j in range(15)])
    for j in range(15):
        total = sum(t[j] for t in trimmed)
        agree = [t[j] for t in trimmed if t[j] != 0 and (t[j] > 0) == (total > 0)]
        merged = sum(agree) / len(agree) if agree and total != 0 else 0.0
        assert out.flatten()[j].item() == pytest.approx(base["w"].flatten()[j].item() + merged, abs=1e-6)


# ---------------------------------------------------------------------------- DARE


def _dare_setup():
    base = {"emb": _randn(4, 6, seed=10), "w": _randn(6, 6, seed=11), "idx": torch.arange(3)}
    models = [{"emb": base["emb"] + _randn(4, 6, seed=20 + i), "w": base["w"] + _randn(6, 6, seed=30 + i),
               "idx": torch.arange(3)} for i in range(2)]
    return base, models


def test_dare_without_drop_is_task_arithmetic_exactly():
    base, models = _dare_setup()
    for weights in (None, [0.3, 1.7]):
        got, want = dare(models, base, drop=0.0, weights=weights), task_arithmetic(models, base, weights=weights)
        assert all(torch.equal(got[p], want[p]) for p in want)


def test_dare_expectation_is_task_arithmetic():
    base, models = _dare_setup()
    want = task_arithmetic(models, base, weights=[0.5, 1.0])
    runs = 400
    mean = {p: torch.zeros_like(t) for p, t in want.items() if t.is_floating_point()}
    for seed in range(runs):
        out = dare(models, base, drop=0.5, seed=seed, weights=[0.5, 1.0])
        for p, m in mean.items():
            m += out[p] / runs
    for p, m in mean.items():
        # per entry the sample mean's std is sqrt(sum w^2 tau^2) / sqrt(runs), about 0.06 here
        torch.testing.assert_close(m, want[p], atol=0.3, rtol=0)
        assert (m - want[p]).abs().mean() < 0.08


def test_dare_keeps_about_one_minus_drop_and_rescales():
    base = {"w": torch.zeros(100, 100)}
    model = {"w": torch.full((100, 100), 2.0)}
    out = dare([model], base, drop=0.3, seed=3)["w"]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 2.0 / 0.7))
    plain = dare([model], base, drop=0.3, rescale=False, seed=3)["w"]
    assert torch.equal(plain != 0, kept) and (plain[kept] == 2.0).all()


def test_dare_reproducible_whatever_the_order():
    base, models = _dare_setup()
    out = dare(models, base, drop=0.4, seed=7)
    assert all(torch.equal(out[p], t) for p, t in dare(models, base, drop=0.4, seed=7).items())
    reversed_ = [{p: m[p] for p in reversed(list(m))} for m in models]
    base_r = {p: base[p] for p in reversed(list(base))}
    again = dare(reversed_, base_r, drop=0.4, seed=7)
    assert list(again) == list(reversed(list(out)))
    assert all(torch.equal(out[p], again[p]) for p in out)
    # a tensor's pattern does not depend on the other tensors
    alone = dare([{"w": m["w"]} for m in models], {"w": base["w"]}, drop=0.4, seed=7)
    assert torch.equal(alone["w"], out["w"])
    assert not torch.equal(dare(models, base, drop=0.4, seed=8)["w"], out["w"])
    # the two operands get different patterns even with equal task vectors
    twin = dare([models[0], models[0]], base, drop=0.5, seed=7, weights=[1.0, 0.0])["w"]
    other = dare([models[0], models[0]], base, drop=0.5, seed=7, weights=[0.0, 1.0])["w"]
    assert not torch.equal(twin, other)


# ---------------------------------------------------------------------------- dtypes and errors


def test_low_precision_operands_keep_their_dtype():
    a = {"w": _t([1.0, 2.0]).bfloat16()}
    b = {"w": _t([2.0, 3.0]).bfloat16()}
    out = linear([a, b])["w"]
    assert out.dtype == torch.bfloat16 and out.tolist() == [[1.5, 2.5]]


def test_merge_errors():
    a = {"x": _t([1.0]), "w": _t([1.0, 2.0]), "idx": torch.tensor([1, 2])}
    with pytest.raises(MergeError, match=r"^w is in model 0 but not in model 1") as e:
        linear([a, {"x": _t([1.0]), "idx": a["idx"]}])
    assert e.value.hint
    with pytest.raises(MergeError, match=r"^extra is in model 1 but not in model 0"):
        linear([a, dict(a, extra=_t([0.0]))])
    with pytest.raises(MergeError, match=r"^w has shape \(1, 2\) in model 0 and \(1, 3\) in model 1"):
        linear([a, dict(a, w=_t([1.0, 2.0, 3.0]))])
    with pytest.raises(MergeError, match=r"^w is in model 0 but not in base"):
        task_arithmetic([a], {"x": _t([0.0]), "idx": a["idx"]})
    with pytest.raises(MergeError, match=r"^idx .* differs in model 1"):
        linear([a, dict(a, idx=torch.tensor([1, 3]))])
    with pytest.raises(MergeError, match=r"^idx .* differs in base"):
        ties([a], dict(a, idx=torch.tensor([2, 2])), density=0.5)
    with pytest.raises(MergeError, match=r"^idx"):
        linear([a, dict(a, idx=torch.tensor([1.0, 2.0]))])
    with pytest.raises(MergeError, match="weights"):
        linear([a, a], weights=[1.0])
    with pytest.raises(MergeError, match="sum to 0"):
        linear([a, a], weights=[1.0, -1.0])
    with pytest.raises(MergeError, match="nothing"):
        linear([])
    with pytest.raises(MergeError, match="density"):
        ties([a], a, density=1.5)
    with pytest.raises(MergeError, match="drop"):
        dare([a], a, drop=1.0)
