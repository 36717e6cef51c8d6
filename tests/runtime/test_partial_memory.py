"""Partial tuning is really partial: PaCA's and SVFit's optimizer state and saved
activations, measured at the tensor level on real training steps (`runtime/memory.py`,
as tests/runtime/test_memory.py measures), scale with the trained fraction or rank.

Every configuration adapts the same weights, the MLP's up and down projections of each
layer (their inputs, the MLP norm's output and the SwiGLU output, are saved by nothing
else, so what each configuration keeps for them is its own), and is compared with
full fine-tuning of those weights: the base model with only them trainable, which
keeps each weight's whole input (in floats per token) and 2 · out · in AdamW moments.
PaCA keeps round(f · in) of the input columns and 2 · out · round(f · in) moments;
SVFit keeps r floats per token and 2 · r moments. The expected numbers are derived
from the shapes below, not read from the cost model; the cost model is then checked
against the same measurement.

`python -m pytest tests/runtime/test_partial_memory.py -s` prints the measured bytes,
LoRA of PaCA's trainable-parameter count beside PaCA.
"""

import functools
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from effc.compiler.cost import Cost, estimate
from effc.compiler.ir import IR
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.pipeline import PASSES
from effc.compiler.swaps import COSTED
from effc.compiler.to_fx import to_fx
from effc.runtime.memory import StepMemory, measure_step, warm_adamw

sys.path.insert(0, str(Path(__file__).parents[1] / "compiler"))
from conftest import model_info  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_memory import ACT_RTOL, ADAMW_STEP_BYTES, LOSS_BYTES, PEAK_HIGH, PEAK_LOW  # noqa: E402

DIM, FFN, LAYERS, BATCH, SEQ = 64, 128, 2, 2, 32
MODEL = f"decoder(vocab=64, dim={DIM}, layers={LAYERS}, heads=4, kv_heads=2, ffn={FFN}, seq={SEQ})"
TARGETS = "layers[*].mlp.{up,down}"
SHAPES = [(DIM, FFN), (FFN, DIM)]  # (in, out) of up and down, in each layer
TOKENS = BATCH * SEQ
FRACTIONS = [0.125, 0.25, 0.5]
RANKS = [4, 8, 16]
# LoRA with PaCA's trainable count at fraction 3/16: 128 · 12 + 64 · 24 = 8 · (64 + 128 + 128 + 64) per layer
EQUAL = (0.1875, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _ir(technique: str | None) -> IR:
    """The model with `technique` on the targets; None: full fine-tuning of the targets."""
    info = model_info(MODEL, f"    adapt m.{TARGETS} with {technique}\n" if technique else "")
    ir, _ = run_passes(lower_model(info), PASSES, PassContext(tuple(info.adapters)))
    if technique is None:
        ir, _ = ir.map_params(lambda p: replace(p, trainable=".mlp.up." in p.path or ".mlp.down." in p.path))
    return ir


@functools.cache
def measured(technique: str | None) -> tuple[IR, Cost, StepMemory]:
    """One warm-up step (AdamW's state exists), then one measured step; values do not
    matter to storage sizes, so every param is N(0, 0.02)."""
    ir = _ir(technique)
    gm = to_fx(ir, SEQ, kernels=COSTED)  # the kernels the cost model counts
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gm.parameters():
            torch.nn.init.normal_(p, std=0.02)
    tokens_BT = torch.randint(0, 64, (BATCH, SEQ))
    targets_BT = torch.randint(0, 64, (BATCH, SEQ))
    opt = warm_adamw(gm, tokens_BT, targets_BT)
    return ir, estimate(ir, BATCH, SEQ), measure_step(gm, gm.parameters(), opt, tokens_BT, targets_BT)


def paca(f: float) -> str:
    return f"paca(fraction={f})"


def svfit(r: int) -> str:
    return f"svfit(rank={r})"


def paca_counts(f: float) -> list[tuple[int, int, int]]:
    """(in, out, trained columns) of every target."""
    return [(i, o, round(f * i)) for _ in range(LAYERS) for i, o in SHAPES]


def trainable_tensors(ir: IR) -> int:
    return sum(p.trainable for p in ir.params() if p.tied_to is None)


# What each configuration keeps for the targets: floats per token saved, elements trained.
def paca_kept(f):
    return sum(c for _, _, c in paca_counts(f)), sum(o * c for _, o, c in paca_counts(f))


def svfit_kept(r):
    return LAYERS * len(SHAPES) * r, LAYERS * len(SHAPES) * r


FULL_SAVED = LAYERS * sum(i for i, _ in SHAPES)  # each target's whole input
FULL_TRAINED = LAYERS * sum(i * o for i, o in SHAPES)
CONFIGS = [(paca(f), *paca_kept(f)) for f in FRACTIONS] + [(svfit(r), *svfit_kept(r)) for r in RANKS]


def _ids(configs):
    return [pytest.param(*c, id=c[0]) for c in configs]


@pytest.mark.parametrize("technique,saved,trained", _ids(CONFIGS))
def test_optimizer_state_is_two_moments_per_trained_element(technique, saved, trained):
    ir, cost, m = measured(technique)
    steps = ADAMW_STEP_BYTES * trainable_tensors(ir)
    assert m.optimizer == 2 * 4 * trained + steps
    assert cost.optimizer_bytes == 2 * 4 * trained and cost.params_trainable == trained
    _, _, full = measured(None)
    full_steps = ADAMW_STEP_BYTES * trainable_tensors(measured(None)[0])
    assert full.optimizer - full_steps == 2 * 4 * FULL_TRAINED
    # the fraction of full fine-tuning's state: round(f · in) / in of each weight, or r / (out · in)
    assert (m.optimizer - steps) / (full.optimizer - full_steps) == trained / FULL_TRAINED


@pytest.mark.parametrize("technique,saved,trained", _ids(CONFIGS))
def test_saved_activations_are_the_trained_part_of_the_inputs(technique, saved, trained):
    """Full fine-tuning saves each target's whole input; the adapters save `saved` floats
    per token in its place and everything else the same."""
    _, _, m = measured(technique)
    _, _, full = measured(None)
    rest = full.activations - 4 * TOKENS * FULL_SAVED  # what neither configuration keeps for the targets
    assert m.activations - rest == 4 * TOKENS * saved
    assert (m.activations - rest) / (full.activations - rest) == saved / FULL_SAVED


@pytest.mark.parametrize("configs", [[paca(f) for f in FRACTIONS], [svfit(r) for r in RANKS]],
                         ids=["paca", "svfit"])
def test_activations_grow_with_the_fraction_as_the_cost_model_says(configs):
    first = measured(configs[0])
    saved = {c: s for c, s, _ in CONFIGS}
    for c in configs[1:]:
        grown = measured(c)[2].activations - first[2].activations
        assert grown == 4 * TOKENS * (saved[c] - saved[configs[0]])
        assert grown == measured(c)[1].activation_bytes - first[1].activation_bytes


@pytest.mark.parametrize("technique", [c for c, _, _ in CONFIGS] + [None, f"lora(rank={EQUAL[1]})"])
def test_the_cost_model_matches_the_measurement(technique):
    """As tests/runtime/test_memory.py holds every configuration: activations exact but
    for the loss the measurement holds, weights exact, the peak in the same band."""
    _, cost, m = measured(technique)
    assert m.activations == cost.activation_bytes + LOSS_BYTES
    assert abs(cost.activation_bytes / m.activations - 1) <= ACT_RTOL
    assert m.weights == cost.weight_bytes
    assert PEAK_LOW <= cost.peak_bytes / m.peak <= PEAK_HIGH, f"{cost.peak_bytes} vs {m.peak}"


def test_paca_beside_lora_of_the_same_trainable_count():
    """PaCA at f = 3/16 and LoRA at rank 8 train the same number of elements, so their
    AdamW state is equal (LoRA's two matrices a weight add one step scalar each); LoRA
    saves each target's whole input plus A x (r floats), PaCA round(f · in) columns."""
    f, r = EQUAL
    p_ir, p_cost, p = measured(paca(f))
    l_ir, l_cost, lora = measured(f"lora(rank={r})")
    assert p_cost.params_trainable == l_cost.params_trainable == paca_kept(f)[1]
    assert p.optimizer - ADAMW_STEP_BYTES * trainable_tensors(p_ir) == \
        lora.optimizer - ADAMW_STEP_BYTES * trainable_tensors(l_ir)
    _, _, full = measured(None)
    rest = full.activations - 4 * TOKENS * FULL_SAVED
    assert p.activations - rest == 4 * TOKENS * paca_kept(f)[0]
    assert lora.activations - rest == 4 * TOKENS * (FULL_SAVED + LAYERS * len(SHAPES) * r)
    rows = [("full fine-tuning", None)] + [(c, c) for c, _, _ in CONFIGS] + [(f"{paca(f)}", paca(f)),
                                                                          (f"lora(rank={r})", f"lora(rank={r})")]
    print(f"\nmeasured bytes, batch={BATCH}, seq={SEQ}, targets {TARGETS} of {MODEL}")
    print(f"{'configuration':24} {'trainable':>10} {'optimizer':>10} {'activations':>12} {'peak':>10}")
    for name, technique in rows:
        ir, cost, m = measured(technique)
        print(f"{name:24} {cost.params_trainable:>10,} {m.optimizer:>10,} {m.activations:>12,} {m.peak:>10,}")
