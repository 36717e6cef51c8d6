"""embedding_rows and bottleneck adapters in real training steps: the cost model's bytes
against the tensor-level measurement of `runtime/memory.py` (as tests/runtime/test_memory.py
does for LoRA and full training), what an embedding-row step never makes, which weights
a few real AdamW steps change, and the rows `effc run` chooses from calibration data.

Every expected number is derived from the shapes: the optimizer holds AdamW's two fp32
moments of R, 2 · 4 · count · dim bytes, plus its step counter; the activations are the
cost model's (no token ids: the table itself is frozen) plus the loss.
"""

import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from effc.compiler.cost import Cost, estimate
from effc.compiler.ir import IR, Op
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.pipeline import PASSES, model_ir
from effc.compiler.swaps import COSTED
from effc.lang.check import check_source
from effc.runtime import data as D
from effc.runtime.checkpoint import read_tensors
from effc.runtime.generate import load
from effc.runtime.memory import StepMemory, measure_step, warm_adamw
from effc.runtime.model import materialize, merged_state, state_of, trainable
from effc.runtime.run import RunOptions, adapter_args, run_pipeline

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "compiler"))
from conftest import model_info  # noqa: E402
from test_memory import ACT_RTOL, ADAMW_STEP_BYTES, LOSS_BYTES, PEAK_HIGH, PEAK_LOW  # noqa: E402

VOCAB, DIM = 256, 64


def spread(count: int) -> str:
    """count ids spread over the vocabulary, so batches hit some rows and miss others."""
    return "[" + ", ".join(str(i * VOCAB // count) for i in range(count)) + "]"


@dataclass(frozen=True)
class Config:
    name: str
    tied: bool
    adapt: str
    batch: int = 2
    seq: int = 32

    def source(self) -> tuple[str, str]:
        decl = (f"decoder(vocab={VOCAB}, dim={DIM}, layers=2, heads=4, kv_heads=2, ffn=128, seq={self.seq}, "
                f"tied={str(self.tied).lower()})")
        return decl, f"    adapt m.{self.adapt}\n"

    @property
    def count(self) -> int:
        return self.adapt.count(",") + 1 if "embedding_rows" in self.adapt else 0


ROWS = [Config(f"rows{n}_{'tied' if tied else 'untied'}", tied, f"embed with embedding_rows(rows={spread(n)})")
        for n, tied in ((1, False), (16, True), (64, True), (64, False))]
BOTTLENECK = [
    Config("series_all", False, "layers[*] with bottleneck(size=8)"),
    Config("parallel_all_tied", True, "layers[*] with bottleneck(size=8, mode=parallel, scale=4.0)"),
    Config("series_last_mlp", False, "layers[1].mlp with bottleneck(size=16)", batch=4),
    Config("parallel_last_attn", False, "layers[1].attn with bottleneck(size=4, mode=parallel)"),
]


def _ids(configs):
    return [pytest.param(c, id=c.name) for c in configs]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(c: Config):
    info = model_info(*c.source())
    ir, _ = run_passes(lower_model(info), PASSES, PassContext(tuple(info.adapters)))
    gm, _ = materialize(ir, c.seq, {}, 0, adapter_args(info, ir), kernels=COSTED)  # what the cost model counts
    g = torch.Generator().manual_seed(0)
    tokens_BT = torch.randint(0, VOCAB, (c.batch, c.seq), generator=g)
    targets_BT = torch.randint(0, VOCAB, (c.batch, c.seq), generator=g)
    return ir, gm, tokens_BT, targets_BT



_cache: dict[str, tuple[IR, Cost, StepMemory]] = {}


def _measured(c: Config) -> tuple[IR, Cost, StepMemory]:
    if c.name not in _cache:
        ir, gm, tokens_BT, targets_BT = _build(c)
        opt = warm_adamw(gm, tokens_BT, targets_BT)
        _cache[c.name] = ir, estimate(ir, c.batch, c.seq), measure_step(gm, gm.parameters(), opt, tokens_BT,
                                                                         targets_BT)
    return _cache[c.name]


# ---------------------------------------------------------------- the cost model against measured steps


@pytest.mark.parametrize("c", _ids(ROWS + BOTTLENECK))
def test_activations_are_the_estimate_and_the_loss(c):
    """Within test_memory.py's tolerance, and exactly: the estimate counts every saved
    tensor; the measurement adds the scalar loss (and sees no token ids, since the frozen
    table saves none)."""
    _, cost, m = _measured(c)
    assert abs(cost.activation_bytes / m.activations - 1) <= ACT_RTOL, (cost.activation_bytes, m.activations)
    assert m.activations == cost.activation_bytes + LOSS_BYTES


@pytest.mark.parametrize("c", _ids(ROWS))
def test_optimizer_state_is_the_chosen_rows_alone(c):
    ir, cost, m = _measured(c)
    assert m.optimizer == 2 * 4 * c.count * DIM + ADAMW_STEP_BYTES  # R's two moments and its step
    assert cost.optimizer_bytes == 2 * 4 * c.count * DIM
    assert m.weights == cost.weight_bytes  # R and the int64 index counted; a tied head once


@pytest.mark.parametrize("c", _ids(BOTTLENECK))
def test_bottleneck_weights_and_optimizer_state(c):
    ir, cost, m = _measured(c)
    tensors = sum(p.trainable for p in ir.params() if p.tied_to is None)
    assert tensors == 4 * sum(n.op is Op.BOTTLENECK for n in ir.nodes())  # D, d, U, u
    assert m.optimizer == cost.optimizer_bytes + ADAMW_STEP_BYTES * tensors
    assert m.weights == cost.weight_bytes


@pytest.mark.parametrize("c", _ids(ROWS + BOTTLENECK))
def test_peak_estimate_is_within_ten_percent(c):
    _, cost, m = _measured(c)
    assert PEAK_LOW <= cost.peak_bytes / m.peak <= PEAK_HIGH, (cost.peak_bytes, m.peak)


# ---------------------------------------------------------------- what a row step never makes


class _Shapes(TorchDispatchMode):
    """The shape of every tensor an op returns in new memory: not a view or an in-place
    result (a matmul's backward transposes the weight it reads, in the weight's storage)."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        read = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.shapes.update(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                           and t.untyped_storage().data_ptr() not in read)
        return out


def _step_shapes(ir, gm, tokens_BT, targets_BT) -> tuple[Counter, list]:
    """One training step's op outputs, and the tensors autograd saved that are not params
    (which cost nothing new)."""
    opt = torch.optim.AdamW([p for _, p in trainable(gm, ir)], lr=1e-3, weight_decay=0.1)
    held = {p.untyped_storage()._cdata for p in gm.parameters()}
    saved = []

    def pack(t):
        if t.untyped_storage()._cdata not in held:
            saved.append(tuple(t.shape))
        return t
    with _Shapes() as mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = gm(tokens_BT, targets_BT)
        loss.backward()
        opt.step()
    return mode.shapes, saved


@pytest.mark.parametrize("c", _ids(ROWS[1:3]))
def test_a_row_step_makes_no_vocab_by_dim_tensor(c):
    """No (V, D) gradient, mask or copy of the table, in forward, backward or the optimizer
    step; and nothing saved with V x D elements. The same step training the whole table
    (the base model, with only the embedding trainable) does make its (V, D) gradient."""
    c = replace(c, seq=24)  # B·T = 48: the flattened (B·T, V) logits are no (D, V) tensor
    ir, gm, tokens_BT, targets_BT = _build(c)
    shapes, saved = _step_shapes(ir, gm, tokens_BT, targets_BT)
    assert (VOCAB, DIM) not in shapes and (DIM, VOCAB) not in shapes
    assert all(torch.Size(s).numel() != VOCAB * DIM for s in saved)
    assert (c.count, DIM) in shapes  # R's gradient and AdamW's update of it
    info = model_info(*c.source()[:1])
    full, _ = lower_model(info).map_params(lambda p: replace(p, trainable=p.path.startswith(("embed", "head"))))
    gm_full, _ = materialize(full, c.seq, {}, 0)
    shapes, _ = _step_shapes(full, gm_full, tokens_BT, targets_BT)
    assert shapes[(VOCAB, DIM)] >= 1


def test_only_the_chosen_rows_change_and_the_tied_head_reads_them():
    """Five real AdamW steps with weight decay on a tied model: the merged table differs
    from the pretrained one in the chosen rows only (every row of them), every other
    weight is bit-identical, and the merged model (its head still tied) gives the adapted
    model's logits."""
    c = ROWS[1]
    ir, gm, tokens_BT, targets_BT = _build(c)
    before = state_of(gm, ir)
    opt = torch.optim.AdamW([p for _, p in trainable(gm, ir)], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        gm(tokens_BT, targets_BT).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = merged_state(ir, state_of(gm, ir))
    index = before["embed.embedding_rows0.index"]
    changed = (after["embed.weight"] != before["embed.weight"]).any(dim=1)
    assert changed.nonzero().flatten().tolist() == index.tolist()
    assert set(after) == {k for k in before if "embedding_rows" not in k}  # no head.weight: still tied
    assert all(torch.equal(after[k], before[k]) for k in after if k != "embed.weight")
    base = run_passes(lower_model(model_info(*c.source()[:1])), PASSES, PassContext())[0]
    merged_gm, fresh = materialize(base, c.seq, after, 0, output="logits")
    assert fresh == []
    adapted, _ = materialize(ir, c.seq, state_of(gm, ir), 0, output="logits")
    with torch.no_grad():
        torch.testing.assert_close(merged_gm(tokens_BT), adapted(tokens_BT), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- calibration in a run

CALIBRATED = """pipeline rows
model m = decoder(vocab=16, dim=16, layers=1, heads=2, ffn=32, seq=16, tied=true)
data d = markov(seq=16, vocab=16, seed=3)
data wide = markov(seq=16, vocab={calib_vocab}, seed=4)
stage s:
    adapt m.embed with embedding_rows(count=5, calibrate={calib})
    train m on d (steps=2, batch=2)
"""


def _run(tmp_path, calib="d", calib_vocab=16):
    src = CALIBRATED.format(calib=calib, calib_vocab=calib_vocab)
    (tmp_path / "p.eff").write_text(src)
    r = check_source(src, str(tmp_path / "p.eff"))
    assert r.ok, r.diagnostics
    run_pipeline(r, tmp_path / "p.eff", RunOptions(tmp_path / "run"))
    return r


@pytest.mark.parametrize("calib", ["d", "d.validation"])
def test_a_run_trains_the_most_frequent_rows_of_the_calibration_data(tmp_path, calib):
    r = _run(tmp_path, calib)
    ds = D.load_data("markov", r.data["d"].args, tmp_path)
    counts = Counter((ds.validation if calib.endswith("validation") else ds.train).tokens.tolist())
    want = sorted(sorted(range(16), key=lambda i: (-counts[i], i))[:5])
    state = read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors")
    assert state["embed.embedding_rows0.index"].tolist() == want
    assert state["embed.embedding_rows0.index"].dtype == torch.int64


def test_calibration_data_outside_the_models_vocab_is_refused(tmp_path):
    src = CALIBRATED.format(calib="wide", calib_vocab=64)
    (d,) = check_source(src, str(tmp_path / "p.eff")).diagnostics
    assert d.code == "E0405" and "calibration data 'wide' produces 64 token ids" in d.message
    assert (d.span.line, d.span.col) == (6, 58)  # at calibrate='s value


def test_a_merged_export_of_a_tied_model_loads_and_gives_the_models_logits(tmp_path):
    src = CALIBRATED.format(calib="d", calib_vocab=16) + 'export m to "out" (format=effc, merge_adapters=true)\n'
    (tmp_path / "p.eff").write_text(src)
    r = check_source(src, str(tmp_path / "p.eff"))
    run_pipeline(r, tmp_path / "p.eff", RunOptions(tmp_path / "run"))
    loaded = load(tmp_path / "out")
    ir, _ = model_ir(r, "m", None)
    state = read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors")
    gm, _ = materialize(ir, 16, state, 0, output="logits")
    x = torch.randint(0, 16, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.decoder.step(x), gm(x), rtol=1e-5, atol=1e-5)
