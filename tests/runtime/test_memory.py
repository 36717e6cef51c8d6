"""The cost model's bytes (`compiler/cost.py`) against real training steps measured by
`runtime/memory.py`, and the tracker itself against known sizes.

Each configuration is built from .eff text, lowered with its adapters, run through one
warm-up step (so AdamW's state exists) and then one measured step. The measurement counts
storages, not allocator pages, so it depends on shapes alone and is the same on every run.
"""

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from effc.compiler.cost import ID_BYTES, Cost, estimate
from effc.compiler.ir import IR, Op
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.pipeline import PASSES
from effc.compiler.swaps import COSTED
from effc.compiler.to_fx import to_fx
from effc.runtime.memory import LiveBytes, StepMemory, measure_step, warm_adamw

sys.path.insert(0, str(Path(__file__).parents[1] / "compiler"))
from conftest import model_info  # noqa: E402

# Activations: estimate - measured is exactly the int64 token ids when the embedding
# trains (the measurement sees them as a pre-existing input) less LOSS_BYTES (the
# measurement holds the loss); the exact accounting is asserted below, the tolerance
# only bounds how much those two terms may weigh.
ACT_RTOL = 0.005
LOSS_BYTES = 8  # the scalar loss and nll_loss's total_weight, saved for its backward
# Peak, estimate / measured over GRID + EDGES: 0.954 (full_gqa_dim256: full training
# at dim 256 beside a vocab of 128, where a weight gradient's temporaries the model
# does not count matter) to 1.062 (rmsnorm_bwd_bound); every other point within 2%.
# The band is the planner's target (the issue's: within 10% of the tensor-level peak).
PEAK_LOW = 0.90
PEAK_HIGH = 1.10
ADAMW_STEP_BYTES = 4  # AdamW's per-param `step` counter, a float32 scalar tensor


@dataclass(frozen=True)
class Config:
    name: str
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    tied: bool
    adapt: str  # a selector and lora arguments, or "" for full training
    batch: int
    seq: int

    def source(self) -> tuple[str, str]:
        decl = (f"decoder(vocab={self.vocab}, dim={self.dim}, layers={self.layers}, heads={self.heads}, "
                f"kv_heads={self.kv_heads}, ffn={self.ffn}, seq={self.seq}, tied={str(self.tied).lower()})")
        return decl, f"    adapt m.{self.adapt}\n" if self.adapt else ""


ALL = "layers[*].**:linear with lora"
QV = "layers[*].attn.{q,v} with lora"
GRID = [
    Config("full_mha", 64, 32, 2, 4, 4, 64, False, "", 2, 32),
    Config("full_gqa_tied_v1024", 1024, 64, 2, 4, 2, 128, True, "", 2, 64),
    Config("full_mqa_T128", 256, 64, 2, 4, 1, 128, False, "", 1, 128),
    Config("full_gqa_dim256", 128, 256, 1, 8, 2, 512, False, "", 4, 16),
    Config("lora_qv_mha", 64, 32, 2, 2, 2, 64, False, f"{QV}(rank=4)", 4, 16),
    Config("lora_qv_drop_gqa_tied", 256, 64, 2, 4, 2, 128, True, f"{QV}(rank=4, dropout=0.1)", 2, 64),
    Config("lora_qv_mqa_tied_v1024", 1024, 64, 2, 4, 1, 128, True, f"{QV}(rank=8)", 2, 32),
    Config("lora_all_mha_tied_v1024", 1024, 64, 2, 4, 4, 128, True, f"{ALL}(rank=4)", 2, 64),
    Config("lora_all_drop_gqa_T128", 256, 64, 2, 4, 2, 192, False, f"{ALL}(rank=4, dropout=0.05)", 1, 128),
    Config("lora_all_drop_mha", 64, 48, 3, 4, 4, 96, False, f"{ALL}(rank=2, dropout=0.1)", 4, 32),
    Config("dora_qv_gqa", 64, 32, 2, 4, 2, 64, False, "layers[*].attn.{q,v} with dora(rank=4)", 2, 32),
    Config("ia3_all_mha", 64, 32, 2, 4, 4, 64, False, "layers[*].**:linear with ia3()", 2, 32),
]


# Shapes where the peak is set by something other than the loss's backward: RMSNorm's
# backward temporaries (small vocab and ffn beside dim), and forward with a frozen prefix
# (attention's repeated k/v, SwiGLU's silu(gate) beside the residual stream). Before the
# cost model counted them the estimate was 0.941, 0.564 and 0.776 of the measured peak.
EDGES = [
    Config("rmsnorm_bwd_bound", 16, 128, 1, 4, 2, 16, False, f"{ALL}(rank=2)", 1, 128),
    Config("forward_attention_bound", 16, 128, 1, 8, 4, 64, False, "head with lora(rank=2)", 4, 64),
    Config("forward_swiglu_bound", 256, 32, 1, 4, 1, 512, True, "layers[0].mlp.down with lora(rank=2)", 4, 16),
]


def _ids(configs):
    return [pytest.param(c, id=c.name) for c in configs]


def _build(c: Config) -> tuple[IR, torch.fx.GraphModule, torch.Tensor, torch.Tensor]:
    info = model_info(*c.source())
    ir, _ = run_passes(lower_model(info), PASSES, PassContext(tuple(info.adapters)))
    gm = to_fx(ir, c.seq, kernels=COSTED)  # the kernels the cost model counts
    torch.manual_seed(0)
    with torch.no_grad():
        for p in gm.parameters():
            if p.is_floating_point():
                torch.nn.init.normal_(p, std=0.02)
    tokens_BT = torch.randint(0, c.vocab, (c.batch, c.seq))
    targets_BT = torch.randint(0, c.vocab, (c.batch, c.seq))
    return ir, gm, tokens_BT, targets_BT



@functools.cache
def _measured(c: Config) -> tuple[IR, Cost, StepMemory]:
    ir, gm, tokens_BT, targets_BT = _build(c)
    opt = warm_adamw(gm, tokens_BT, targets_BT)
    return ir, estimate(ir, c.batch, c.seq), measure_step(gm, gm.parameters(), opt, tokens_BT, targets_BT)


def _embedding_trains(ir: IR) -> bool:
    return any(p.trainable for n in ir.nodes() if n.op is Op.EMBEDDING for p in n.params)


# The tracker against known sizes

def test_tracker_counts_only_the_device_it_is_given():
    """On a GPU the run's measure is the GPU's memory: host tensors (offload's) are left out."""
    with LiveBytes(device="cuda") as gpu:
        x = torch.empty(1000)
        y = x + 1
        assert gpu.bytes == 0 and gpu.peak == 0
    with LiveBytes(device="cpu") as cpu:
        z = x * 2
        assert cpu.bytes == 4000
    del y, z


def test_tracker_counts_a_storage_once_until_it_is_freed():
    with LiveBytes() as live:
        base = live.bytes
        x = torch.empty(1000)  # float32
        # still counted though the tracker dropped its handle on the storage: torch keeps
        # that Python object alive with x, so its finalizer has not fired
        assert live.bytes - base == 4000
        v = x[10:].view(9, 110)  # views share x's storage
        x.add_(1)  # in place: no new storage
        assert live.bytes - base == 4000
        del x
        assert live.bytes - base == 4000  # the view still holds the storage
        del v
        assert live.bytes == base
        assert live.peak == base + 4000
        live.reset_peak()
        assert live.peak == base


def test_track_counts_existing_tensors_once_and_ignores_meta():
    w = torch.zeros(8, 16)  # made before the mode: only track() counts it
    with LiveBytes() as live:
        for t in (w, w.t(), w[0], torch.nn.Parameter(w)):
            live.track(t)
        assert live.bytes == 8 * 16 * 4
        live.track(torch.empty(1000, device="meta"))
        torch.empty(1000, device="meta")
        assert live.bytes == 8 * 16 * 4
        y = w @ w.t()  # (8, 8)
        assert live.bytes == (8 * 16 + 8 * 8) * 4
        del y
        assert live.bytes == 8 * 16 * 4


def test_tracker_sees_backward_and_gradients():
    x = torch.randn(1000, requires_grad=True)
    with LiveBytes() as live:
        live.track(x)
        y = (x * 2).sum()  # x * 2 is a temporary: mul by a constant saves nothing
        assert live.bytes == 4000 + 4
        y.backward()
        assert live.bytes == 4000 + 4 + 4000  # x.grad, made by the backward of mul
        x.grad = None
        assert live.bytes == 4000 + 4
        assert live.peak == 4000 + 4 + 4 + 4000  # during backward: the seed gradient of y


def test_a_training_step_frees_everything_it_creates():
    """Every storage made by forward, backward, step and zero_grad is seen freed: the
    finalizers fire, so live bytes come back to the baseline exactly."""
    _, gm, tokens_BT, targets_BT = _build(GRID[5])
    opt = warm_adamw(gm, tokens_BT, targets_BT)
    state = [t for s in opt.state.values() for t in s.values()]
    with LiveBytes() as live:
        for t in [*gm.parameters(), *gm.buffers(), *state, tokens_BT, targets_BT]:
            live.track(t)
        baseline = live.bytes
        loss = gm(tokens_BT, targets_BT)
        assert live.bytes > baseline
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert live.bytes == baseline
        assert live.peak > baseline


# The cost model against measured steps

@pytest.mark.parametrize("c", _ids(GRID + EDGES))
def test_activations_match_the_estimate(c):
    _, cost, m = _measured(c)
    err = cost.activation_bytes / m.activations - 1
    assert abs(err) <= ACT_RTOL, f"{c.name}: estimate {cost.activation_bytes} vs measured {m.activations} ({err:+.2%})"


@pytest.mark.parametrize("c", _ids(GRID + EDGES))
def test_activations_differ_only_by_token_ids_and_the_loss(c):
    ir, cost, m = _measured(c)
    ids = ID_BYTES * c.batch * c.seq * _embedding_trains(ir)
    assert m.activations == cost.activation_bytes - ids + LOSS_BYTES, c.name


@pytest.mark.parametrize("c", _ids(GRID))
def test_weights_and_optimizer_state_match_the_estimate(c):
    ir, cost, m = _measured(c)
    assert m.weights == cost.weight_bytes, c.name  # a tied head reads the embedding's storage
    n_trainable = sum(p.trainable for p in ir.params() if p.tied_to is None)
    assert m.optimizer == cost.optimizer_bytes + ADAMW_STEP_BYTES * n_trainable, c.name


@pytest.mark.parametrize("c", _ids(GRID + EDGES))
def test_peak_estimate_is_within_ten_percent(c):
    _, cost, m = _measured(c)
    ratio = cost.peak_bytes / m.peak
    assert PEAK_LOW <= ratio <= PEAK_HIGH, f"{c.name}: estimate {cost.peak_bytes} vs measured {m.peak} ({ratio:.3f})"
