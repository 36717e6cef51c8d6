"""Cost against hand-computed numbers on a tiny model, and a 70B-style declaration that
lowers, verifies and costs without torch and without allocating a weight."""

import subprocess
import sys
import textwrap

import pytest

from effc.compiler.cost import estimate, format_cost
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes

# vocab 64, dim 16, 2 heads of 8, 1 kv head (kv width 8), ffn 24, tied head
TINY = "decoder(vocab=64, dim=16, layers=1, heads=2, kv_heads=1, ffn=24, seq=8, tied=true)"
B, T = 2, 8
TOKENS = B * T


def test_full_training_bytes_and_flops(make_model):
    c = estimate(lower_model(make_model(TINY)), B, T)
    # embed 1024 + norms 3*16 + q 256 + k 128 + v 128 + o 256 + mlp 3*384; head tied
    assert c.params_total == c.params_trainable == 2992
    assert c.weight_bytes == c.grad_bytes == 2992 * 4
    assert c.optimizer_bytes == 2 * 2992 * 4
    # Saved floats per token: embed out 16 (attn_norm input), attn_norm out 16 (q/k/v
    # input, once), rope_q 16, core out 16 (attention), attn residual 16 (mlp_norm
    # input), mlp_norm out 16 (gate/up input), gate 24, up 24 (swiglu), swiglu out 24
    # (down input), mlp residual 16 (norm input), norm out 16 (head input), log-probs 64
    floats = 16 + 16 + 16 + 16 + 16 + 16 + 24 + 24 + 24 + 16 + 16 + 64
    # plus token ids 8 bytes, three rstd 4 bytes each, logsumexp 2 heads * 4 bytes, and
    # k and v saved as their copies for the 2 query heads (2 * 16 floats: 128 bytes)
    assert c.activation_bytes == TOKENS * (4 * floats + 8 + 3 * 4 + 2 * 4 + 128) == 19392
    # the largest backward temporaries: the loss's grads of log-probs and logits (2 * 64)
    # beat swiglu (4 * 24) and the head's output and input grads (64 + 16)
    assert c.transient_bytes == TOKENS * 4 * 2 * 64
    # the peak is the loss's backward: weights and AdamW's two moments, every activation
    # still held and the loss's temporaries, with no gradient allocated yet
    assert c.peak_bytes == 3 * 2992 * 4 + 19392 + 8192
    # matmul elements: 768 attention + 1152 mlp + 1024 head (tied, still multiplied)
    # attention: 4 * T * (heads * head_dim) = 4 * 8 * 16
    assert c.flops_forward_per_token == 2 * 2944 + 512 == 6400
    assert c.flops_train_per_token == 3 * 6400


def test_lora_training_bytes_and_flops(make_model):
    info = make_model(TINY, "    adapt m.layers[0].attn.{q,v} with lora(rank=2)\n")
    ctx = PassContext(tuple(info.adapters))
    ir, _ = run_passes(lower_model(info), ["apply_lora", "assign_roles"], ctx)
    c = estimate(ir, B, T)
    adapters = 2 * (16 + 16) + 2 * (16 + 8)
    assert c.params_trainable == adapters == 112 and c.params_total == 2992 + 112
    assert c.grad_bytes == 112 * 4 and c.optimizer_bytes == 2 * 112 * 4
    # Nothing upstream of the adapters needs a gradient: the embedding and attn_norm save
    # nothing. Saved floats: attn_norm out 16 (the LoRA input, once), rope_q 16, core out
    # 16, attn residual 16, gate 24, up 24, mlp residual 16, log-probs 64; frozen linears
    # keep no input. Extra bytes: two A x of rank 2, two rstd, logsumexp of 2 heads, and
    # the per-query-head copies of k and v (128).
    floats = 16 + 16 + 16 + 16 + 24 + 24 + 16 + 64
    assert c.activation_bytes == TOKENS * (4 * floats + 2 * 2 * 4 + 2 * 4 + 2 * 4 + 128) == 14848
    assert c.flops_forward_per_token == 6400 + 2 * adapters
    # backward: adapter weight grads 2*112; the gradient at A x, which A's gradient needs
    # (2 * rank * out for q and v); attention 8*T*16; input grads of o, gate, up, down and
    # head (2 * (256 + 3*384 + 1024)); q, k, v and the adapters read attn_norm, which needs
    # no gradient
    backward = 2 * 112 + 2 * 2 * (16 + 8) + 8 * 8 * 16 + 2 * (256 + 3 * 384 + 1024)
    assert c.flops_train_per_token == c.flops_forward_per_token + backward == 12832


def test_lora_dropout_keeps_a_copy_and_a_mask(make_model):
    two = TINY.replace("layers=1", "layers=2")
    costs = []
    for extra in ("", ", dropout=0.1"):
        info = make_model(two, f"    adapt m.layers[*].attn.q with lora(rank=2{extra})\n")
        ir, _ = run_passes(lower_model(info), ["apply_lora"], PassContext(tuple(info.adapters)))
        costs.append(estimate(ir, B, T).activation_bytes)
    # Without dropout each LoRA saves its input, attn_norm's output (16 floats). With
    # dropout it saves a private dropped copy instead (16 floats), plus a 16-byte mask in
    # layer 1 only: layer 0's input needs no gradient, so its mask is never kept.
    assert costs[1] - costs[0] == TOKENS * 16


def test_format_cost_table(make_model):
    text = format_cost(estimate(lower_model(make_model(TINY)), B, T))
    lines = text.splitlines()
    assert lines[0].split() == ["params", "total", "2,992"]
    assert "bytes activations (batch=2, seq=8)" in text and "18.94 KiB" in text
    assert lines[-1].split() == ["FLOPs/token", "train", "step", "19,200"]


def test_unknown_optimizer(make_model):
    with pytest.raises(ValueError, match="no cost model for optimizer 'lion'"):
        estimate(lower_model(make_model(TINY)), B, T, optimizer="lion")


def test_70b_declaration_costs_without_torch():
    script = textwrap.dedent("""
        import sys
        from effc.lang.check import check_source
        from effc.compiler.lower import lower_model
        from effc.compiler.verify import verify
        from effc.compiler.cost import estimate
        from effc.compiler.passes import PassContext, run_passes
        src = '''pipeline big
        model m = decoder(vocab=128256, dim=8192, layers=80, heads=64, kv_heads=8, ffn=28672, seq=8192)
        data d = markov(seq=8192)
        stage s:
            train m on d (steps=1, batch=1)
        '''
        r = check_source(src)
        assert r.ok, r.diagnostics
        ir = lower_model(r.models["m"])
        verify(ir)
        ir, _ = run_passes(ir, ["apply_lora", "assign_roles"], PassContext(), verify_each=True)
        c = estimate(ir, 1, 8192)
        print(c.params_total, c.peak_bytes)
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    total, peak, torch_loaded = out.stdout.split()
    V, D, L, F, KV = 128256, 8192, 80, 28672, 1024
    assert int(total) == 2 * V * D + L * (2 * D + 2 * D * D + 2 * D * KV + 3 * D * F) + D
    assert int(total) == 70_553_706_496  # Llama-3-70B's published count
    assert int(peak) > 16 * int(total)  # weights, grads and two AdamW moments in fp32
    assert torch_loaded == "False"
