"""Soft prompts (`prompt(length=n)`): a prompt is n extra tokens in front of every
sequence whose embedding rows are trained. The reference written out here is exactly
that: the base model's graph, with the prompt appended to its embedding table as n new
rows, run on those n row ids followed by the tokens (their targets ignored). Loss,
logits and every gradient must agree; packed rows must equal each record run alone
after the prompt; the cost model counts the n positions; no merge exists."""

import pytest
import torch
from torch.func import functional_call

from effc.compiler.adapters import CannotMerge, prefix_length
from effc.compiler.cost import estimate
from effc.compiler.ir import IR
from effc.compiler.lower import lower_model
from effc.compiler.passes import PassContext, run_passes
from effc.compiler.pipeline import PASSES
from effc.compiler.swaps import COSTED
from effc.compiler.to_fx import IGNORE, fx_name
from effc.lang.check import check_source
from effc.runtime.generate import Decoder
from effc.runtime.model import materialize, merged_state, state_of

N, SEQ, VOCAB = 3, 8, 13
MODEL = f"decoder(vocab={VOCAB}, dim=24, layers=2, heads=4, kv_heads=2, ffn=20, seq={SEQ})"


def _build(body, decl=MODEL):
    src = f"pipeline t\nmodel m = {decl}\ndata d = markov(seq={SEQ}, vocab={VOCAB})\nstage s:\n{body}" \
          "    train m on d (steps=1, batch=2)\n"
    r = check_source(src)
    assert r.ok, r.diagnostics
    info = r.models["m"]
    ir, _ = run_passes(lower_model(info), PASSES, PassContext(tuple(info.adapters)), verify_each=True)
    return info, ir, lower_model(info)


def _random_state(ir, seed=0):
    gm, _ = materialize(ir, SEQ, {}, seed)
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in state_of(gm, ir).items()}


def _reference(base_ir, state, tokens_BT, targets_BT):
    """The base model on [n prompt ids, tokens]: the prompt rows appended to the table."""
    base, _ = materialize(base_ir, SEQ + N, {}, 0)  # rotary tables long enough for n + T
    params = {fx_name(k): v for k, v in state.items() if not k.startswith("embed.prompt")}
    params["embed.weight"] = torch.cat((state["embed.weight"], state["embed.prompt0.embeddings"]))
    B = tokens_BT.shape[0]
    ids = torch.cat((torch.arange(VOCAB, VOCAB + N).expand(B, N), tokens_BT), dim=1)
    targets = torch.cat((torch.full((B, N), IGNORE), targets_BT), dim=1)
    return functional_call(base, params, (ids, targets))


def _tokens(seed=0, T=SEQ):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, T), generator=g), torch.randint(0, VOCAB, (2, T), generator=g)


def test_loss_and_gradients_equal_extra_tokens_with_trained_rows():
    info, ir, base = _build(f"    adapt m with prompt(length={N})\n")
    assert prefix_length(ir) == N
    state = {k: v.requires_grad_() for k, v in _random_state(ir).items()}
    gm, fresh = materialize(ir, SEQ, state, 0)
    assert fresh == []
    x, y = _tokens()
    loss = gm(x, y)
    loss.backward()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in state.items()}
    ref = _reference(base, leaves, x, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    P = gm.get_parameter("embed.prompt0.embeddings")
    assert P.requires_grad and P.grad.abs().max() > 0
    torch.testing.assert_close(P.grad, leaves["embed.prompt0.embeddings"].grad, rtol=1e-4, atol=1e-6)
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == ["embed.prompt0.embeddings"]


def test_logits_keep_the_inputs_length_and_init_vocab_copies_embedding_rows():
    info, ir, _ = _build(f"    adapt m with prompt(length={N})\n")
    gm, fresh = materialize(ir, SEQ, {}, 4, {"embed.prompt0": {"init": "vocab"}}, output="logits")
    P, W = gm.get_parameter("embed.prompt0.embeddings"), gm.get_parameter("embed.weight")
    assert all(any(torch.equal(row, w) for w in W) for row in P)  # each row is a row of the table
    x, _ = _tokens(1)
    assert gm(x).shape == (2, SEQ, VOCAB)


def test_a_packed_row_equals_each_record_after_the_prompt_alone():
    """Records packed in one row each see the whole prompt (segment -1) and count their
    positions on from n: the same logits as each record run alone after the prompt."""
    _, ir, _ = _build(f"    adapt m with prompt(length={N})\n")
    gm, _ = materialize(ir, SEQ, _random_state(ir, 1), 0, output="logits")
    lengths = [3, 5]
    g = torch.Generator().manual_seed(2)
    records = [torch.randint(0, VOCAB, (1, n), generator=g) for n in lengths]
    tokens = torch.cat(records, dim=1)
    segments = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    positions = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    with torch.no_grad():
        packed = gm(tokens, segments, positions)
        alone = torch.cat([gm(r) for r in records], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_the_incremental_decoder_reads_the_prompt_once():
    _, ir, _ = _build(f"    adapt m with prompt(length={N})\n    adapt m.layers[*].attn.q with lora(rank=2)\n")
    gm, _ = materialize(ir, SEQ, _random_state(ir, 2), 0, output="logits")
    gm.eval()
    x, _ = _tokens(3)
    dec = Decoder(ir, gm, SEQ)
    torch.testing.assert_close(dec.step(x[:1, :4]), gm(x[:1, :4]).detach(), atol=1e-5, rtol=1e-5)
    for j in range(4, SEQ):
        got = dec.step(x[:1, j:j + 1])[:, -1]
        torch.testing.assert_close(got, gm(x[:1, :j + 1])[:, -1].detach(), atol=1e-5, rtol=1e-5)
    assert dec.pos == SEQ + N == dec.capacity
    with pytest.raises(ValueError, match="past the model's seq"):
        dec.step(x[:1, :1])


def test_cost_counts_the_prompt_positions_and_its_parameters():
    _, ir, base = _build(f"    adapt m with prompt(length={N})\n")
    c, b = estimate(ir, 2, SEQ), estimate(base, 2, SEQ + N)
    assert c.params_trainable == N * 24 and c.params_total == b.params_total + N * 24
    assert c.seq == SEQ + N and c.flops_forward_per_token == b.flops_forward_per_token


def test_no_merge_and_the_checker_says_so():
    _, ir, _ = _build(f"    adapt m with prompt(length={N})\n")
    gm, _ = materialize(ir, SEQ, {}, 0)
    with pytest.raises(CannotMerge, match="input positions"):
        merged_state(ir, state_of(gm, ir))
    src = (f"pipeline t\nmodel m = {MODEL}\ndata d = markov(seq={SEQ}, vocab={VOCAB})\nstage s:\n"
           f"    adapt m with prompt(length={N})\n    train m on d (steps=1)\n"
           'export m to "out" (format=effc, merge_adapters=true)\n')
    assert [d.code for d in check_source(src).diagnostics] == ["E0409"]


def test_learned_positions_must_hold_the_prompt_and_the_data(tmp_path):
    """GPT-2 has a table of n_positions rows: data seq + prompt length must fit in it
    (checking reads config.json only)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50, "n_embd": 32, "n_layer": 1,
        "n_head": 4, "n_positions": 16}))

    def codes(data_seq):
        src = (f'pipeline t\nmodel m = hf("{tmp_path}")\ndata d = markov(seq={data_seq}, vocab=50)\nstage s:\n'
               "    adapt m with prompt(length=4)\n    train m on d (steps=1)\n")
        return [(d.code, d.message) for d in check_source(src).diagnostics]

    assert codes(12) == []
    (code, message), = codes(13)
    assert code == "E0402" and "adds 4 positions" in message and "16 learned positions" in message


def test_round_trip_and_order_with_other_embedding_adapters():
    info, ir, _ = _build(f"    adapt m with prompt(length={N})\n    adapt m.layers[0].mlp.up with lora(rank=2)\n")
    assert IR.from_json(ir.to_json()) == ir
    assert ir.inputs("embed") == ["embed.prompt0"]


def test_activation_bytes_match_the_tensor_level_measurement():
    """The cost model's activations of a prompt-tuning step against runtime/memory.py's
    count of live storages (the tolerance and the accounting of test_memory.py: the
    measurement also holds the scalar loss)."""
    from effc.runtime.memory import measure_step, warm_adamw

    _, ir, _ = _build(f"    adapt m with prompt(length={N})\n")
    gm, _ = materialize(ir, SEQ, _random_state(ir, 5), 0, kernels=COSTED)  # what the cost model counts
    x, y = _tokens(7)
    m = measure_step(gm, gm.parameters(), warm_adamw(gm, x, y), x, y)
    assert m.activations == estimate(ir, 2, SEQ).activation_bytes + 8  # LOSS_BYTES of test_memory.py
