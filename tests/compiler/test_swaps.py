"""Kernel swaps (compiler/swaps.py): which fired, where they came from, and that a graph
with swaps computes what the reference graph computes -- one step's loss and gradients,
and a whole training curve."""

import operator

import pytest
import torch
import torch.nn.functional as F

from effc.compiler.ir import Op
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.swaps import KERNELS, resolve
from effc.compiler.to_fx import to_fx
from effc.kernels.linear_ce import linear_cross_entropy
from effc.kernels.lora import lora_linear
from effc.kernels.quant import dequantize_int8, int8_linear
from effc.kernels.rmsnorm import rms_norm
from effc.kernels.rotary import rotary
from effc.kernels.swiglu import swiglu
from effc.runtime.model import materialize, state_of

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 8
MODEL = "decoder(vocab=13, dim=24, layers=2, heads=4, kv_heads=2, ffn=20, seq=8)"
LORA = ("    adapt m.layers[*].attn.{q,v} with lora(rank=2, alpha=6, dropout=0.1)\n"
        "    adapt m.layers[0].mlp.down with lora(rank=3)\n")


def build(make_model, body="", passes=("apply_lora", "assign_roles")):
    info = make_model(MODEL, body)
    ir, _ = run_passes(lower_model(info), list(passes), PassContext(tuple(info.adapters), tuple(info.edits)))
    return ir


def count(ir, op):
    return sum(n.op is op for n in ir.nodes())


def test_every_swap_fires_once_per_site_and_names_its_ir_nodes(make_model):
    ir = build(make_model, LORA)
    gm = to_fx(ir, SEQ)
    fired = gm.meta["swaps"]
    by = lambda k: [f for f in fired if f.kernel == k]  # noqa: E731
    assert len(by("rms_norm")) == count(ir, Op.RMSNORM) == 5
    assert len(by("swiglu")) == count(ir, Op.SWIGLU) == 2
    assert len(by("rotary")) == count(ir, Op.ROTARY) == 4
    assert len(by("lora_linear")) == count(ir, Op.LORA) == 5
    assert len(by("linear_cross_entropy")) == 1
    assert {f.ir for f in by("lora_linear")} == {(f"{n.id}", n.attrs.target) for n in ir.nodes() if n.op is Op.LORA}
    assert by("linear_cross_entropy")[0].ir == ("head", "loss")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for fn, k in ((rms_norm, 5), (swiglu, 2), (rotary, 4), (lora_linear, 5), (linear_cross_entropy, 1)):
        assert targets.count(fn) == k
    # nothing of the references is left: no low-rank chain, no standalone head
    assert targets.count(F.linear) == count(ir, Op.LINEAR) - count(ir, Op.LORA) - 1
    lora_ids = {n.id for n in ir.nodes() if n.op is Op.LORA}
    assert not [n for n in gm.graph.nodes if n.target is operator.mul and n.meta.get("ir") in lora_ids]
    # calibration's map of IR outputs still names live nodes
    live = {n.name for n in gm.graph.nodes}
    assert set(gm.meta["ir_nodes"].values()) <= live


def test_kernels_choose_the_swaps(make_model):
    ir = build(make_model, LORA)
    assert to_fx(ir, SEQ, kernels="none").meta["swaps"] == []
    only = to_fx(ir, SEQ, kernels=("rotary", "swiglu")).meta["swaps"]
    assert {f.kernel for f in only} == {"rotary", "swiglu"}
    assert resolve("all") == KERNELS and resolve(None) == KERNELS
    with pytest.raises(ValueError, match="unknown kernel 'fused'"):
        resolve(("fused",))


def test_quantized_linears_swap_to_their_packed_ops(make_model):
    body = "    quantize m.layers[*].mlp.** to int8()\n"  # int4 and nf4 groups need >= 32 columns
    ir = build(make_model, body, ("quantize_linear", "assign_roles"))
    gm = to_fx(ir, SEQ)
    quant = [f for f in gm.meta["swaps"] if f.kernel == "quant_linear"]
    assert len(quant) == 6 and {f.op for f in quant} == {"int8_linear"}
    assert sum(n.target is int8_linear for n in gm.graph.nodes) == 6
    assert not any(n.target is dequantize_int8 for n in gm.graph.nodes)


def _step(gm, x, y, seed=0):
    torch.manual_seed(seed)
    gm.zero_grad(set_to_none=True)
    loss = gm(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("body", ["", LORA])
def test_one_step_with_and_without_swaps_agrees(make_model, body):
    """Loss and every gradient, same weights, same dropout masks (seeded): float32
    rounding only (kernels sum in other orders), to rtol 1e-5 on the loss and 1e-4 on
    gradients with an absolute floor of 1e-6 of their scale."""
    ir = build(make_model, body)
    ref, _ = materialize(ir, SEQ, {}, 0, kernels="none")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    fast, _ = materialize(ir, SEQ, state_of(ref, ir), 0)
    assert len(fast.meta["swaps"]) > 0
    x = torch.randint(0, 13, (3, SEQ), generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 13, (3, SEQ), generator=torch.Generator().manual_seed(3))
    ref.train(), fast.train()
    l0, g0 = _step(ref, x, y)
    l1, g1 = _step(fast, x, y)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6 * float(g0[k].abs().max()) + 1e-9)


def test_a_training_curve_with_and_without_swaps(make_model):
    """30 AdamW steps of LoRA training from the same start: the per-step losses agree
    within 1e-4 relative (rounding differences grow slowly through the updates)."""
    ir = build(make_model, LORA)
    ref, _ = materialize(ir, SEQ, {}, 0, kernels="none")
    fast, _ = materialize(ir, SEQ, state_of(ref, ir), 0)
    curves = []
    for gm in (ref, fast):
        params = [p for p in gm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
        gm.train()
        losses = []
        for s in range(30):
            g = torch.Generator().manual_seed(100 + s)  # counting mod 13 from a random start
            x = (torch.randint(0, 13, (4, 1), generator=g) + torch.arange(SEQ + 1)) % 13
            torch.manual_seed(s)
            loss = gm(x[:, :-1], x[:, 1:])
            (loss / (4 * SEQ)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item() / (4 * SEQ))
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]  # it learns
    for a, b in zip(*curves):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_a_quantized_head_is_fused_with_the_loss(make_model):
    """The fused loss runs first and takes the head's dequantized weight as its operand
    (no (N, V) logits); the result equals the reference graph's."""
    ir = build(make_model, "    quantize m.head to int8()\n", ("quantize_linear", "assign_roles"))
    gm = to_fx(ir, SEQ)
    fused = [n for n in gm.graph.nodes if n.target is linear_cross_entropy]
    assert len(fused) == 1 and fused[0].args[1].target is dequantize_int8
    ref = to_fx(ir, SEQ, kernels="none")
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for (name, p), (_, q) in zip(ref.state_dict(keep_vars=True).items(), gm.state_dict(keep_vars=True).items()):
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1 if name.endswith("norm.weight") else 0))
            else:
                p.copy_(torch.randint(-100, 100, p.shape, generator=g).to(p.dtype))
            q.copy_(p)
    x = torch.randint(0, 13, (2, SEQ))
    torch.testing.assert_close(gm(x, x), ref(x, x), rtol=1e-5, atol=1e-5)
