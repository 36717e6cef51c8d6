"""Hugging Face checkpoints in and out, against transformers on the same weights.

Every checkpoint here is written by transformers itself (`save_pretrained`) from a tiny
config with random weights, so effc's reading of the files, its name mapping and its
computation are all checked against the library that defines the format: logits (and
BERT's mean-pooled hidden states) must agree to fp32 round-off (1e-5), and a model
effc exports must load in transformers' Auto classes and give effc's logits (1e-4).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors.torch import load_file

from effc.compiler.lower import lower_arch
from effc.compiler.pipeline import compile_checked, model_ir
from effc.lang.check import check_source
from effc.lang.hf import HFConfigError, read_hf
from effc.runtime.checkpoint import read_tensors
from effc.runtime.hf import CheckpointReader, HFError, load, write_hf
from effc.runtime.model import materialize, state_of
from effc.runtime.run import RunFailed, RunOptions, run_pipeline

VOCAB, SEQ = 97, 64

CONFIGS = {
    "llama_bias": lambda: T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, rope_theta=500.0, rms_norm_eps=1e-6,
        attention_bias=True, mlp_bias=True),
    "qwen2_tied": lambda: T.Qwen2Config(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=True),
    "mistral_head_dim": lambda: T.MistralConfig(  # head_dim 16 != hidden 48 / 4 heads; one kv head
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=SEQ, sliding_window=None),
    "llama3_rope": lambda: T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=SEQ, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear_rope": lambda: T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=SEQ, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=SEQ,
                                 bos_token_id=0, eos_token_id=0),
    "bert": lambda: T.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=80, max_position_embeddings=SEQ),
}
DECODERS = [k for k in CONFIGS if k != "bert"]


def _model(config):
    return (T.AutoModel if isinstance(config, T.BertConfig) else T.AutoModelForCausalLM).from_config(config)


def _write(name: str, folder: Path, **save) -> Path:
    torch.manual_seed(sorted(CONFIGS).index(name))
    model = _model(CONFIGS[name]())
    with torch.no_grad():  # norms and biases start at 1 and 0: perturb them so each one matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, **save)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _write(name, root / name) for name in CONFIGS}


def _reference(folder: Path):
    cls = T.AutoModel if "bert" in folder.name else T.AutoModelForCausalLM
    return cls.from_pretrained(folder).eval()


@pytest.mark.parametrize("name", DECODERS)
def test_logits_match_transformers(ckpt, name):
    ref = _reference(ckpt[name])
    _, _, gm = load(str(ckpt[name]), output="logits")
    x = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x).logits, gm(x)
    assert want.abs().max() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bert_mean_pooled_hidden_states_match_transformers(ckpt):
    ref = _reference(ckpt["bert"])
    _, ir, gm = load(str(ckpt["bert"]))
    x = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(2))
    keep = torch.ones(3, 29, dtype=torch.bool)
    keep[1, 20:] = False  # padding: hidden from attention and from the mean
    keep[2, 5:] = False
    with torch.no_grad():
        h = ref(input_ids=x, attention_mask=keep.long()).last_hidden_state
        w = keep[..., None].float()
        want = (h * w).sum(1) / w.sum(1)
        got = gm(x, keep)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_scaling_changes_the_logits(ckpt, tmp_path):
    """The scaled-rope checkpoints would pass the logits test even if scaling were
    ignored, were it not to matter: without it, logits differ."""
    plain = tmp_path / "plain"
    shutil.copytree(ckpt["llama3_rope"], plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    (plain / "config.json").write_text(json.dumps(cfg))
    x = torch.randint(0, VOCAB, (1, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = load(str(ckpt["llama3_rope"]), output="logits")[2](x)
        b = load(str(plain), output="logits")[2](x)
    assert (a - b).abs().max() > 1e-3


def test_sharded_checkpoint_reads_the_same_weights(ckpt, tmp_path):
    sharded = _write("llama_bias", tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(load(str(sharded), output="logits")[2](x),
                                   load(str(ckpt["llama_bias"]), output="logits")[2](x), atol=0, rtol=0)


def test_reader_reads_only_what_is_asked(ckpt):
    """Lazy: building the reader touches headers; each item reads one tensor (GPT-2's
    q, k and v are thirds of one fused c_attn, transposed from Conv1D's (in, out))."""
    model = read_hf(str(ckpt["gpt2"]))
    reader = CheckpointReader(model, lower_arch(model.arch, None))
    ref = _reference(ckpt["gpt2"])
    c_attn = ref.transformer.h[1].attn.c_attn
    for i, part in enumerate("qkv"):
        torch.testing.assert_close(reader[f"layers[1].attn.{part}.weight"], c_attn.weight[:, 48 * i: 48 * (i + 1)].T)
        torch.testing.assert_close(reader[f"layers[1].attn.{part}.bias"], c_attn.bias[48 * i: 48 * (i + 1)])
    assert "head.weight" not in reader  # tied to the embedding: not a tensor of its own


# ---------------------------------------------------------------- checking reads config.json only

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
             "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 131072,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
             "rope_theta": 500000.0}


def _pipeline(folder: Path, body: str, seq: int = 64, data: str = "markov(seq=64, vocab=97)") -> str:
    return (f'pipeline p\nmodel m = hf("{folder}", seq={seq})\ndata d = {data}\n'
            f"stage s:\n{body}")


def test_a_70b_config_alone_checks_and_costs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    src = _pipeline(tmp_path, "    adapt m.layers[*].attn.{q,v} with lora(rank=16)\n"
                               "    train m on d (steps=10, batch=1)\n", seq=4096,
                    data='markov(seq=4096, vocab=97)')
    r = check_source(src, str(tmp_path / "p.eff"))
    assert r.ok, r.diagnostics
    (build,) = compile_checked(r).builds
    # Llama 3 70B: embed + head 2 V D, per layer 2 D (norms) + D*D*2 (q, o) + 2 D*1024 (k, v)
    # + 3 D F; the final norm D. That is the published 70.6B.
    V, D, F, L, KV = 128256, 8192, 28672, 80, 1024
    base = 2 * V * D + L * (2 * D + 2 * D * D + 2 * D * KV + 3 * D * F) + D
    lora = L * 16 * ((D + D) + (D + KV))
    assert build.cost.params_total == base + lora and 70.5e9 < base < 70.6e9
    assert build.cost.params_trainable == lora


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["FalconForCausalLM"]}, "architecture 'FalconForCausalLM' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act=\"gelu\""),
    ({"sliding_window": 32}, "sliding_window=32 is shorter than the sequence (64)"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide num_attention_heads=4"),
    ({"hidden_size": "48"}, "'hidden_size' is '48', expected int"),
])
def test_bad_configs_are_diagnostics_at_the_path(ckpt, tmp_path, edit, message):
    folder = tmp_path / "m"
    folder.mkdir()
    cfg = json.loads((ckpt["mistral_head_dim"] / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(edit)
    (folder / "config.json").write_text(json.dumps(cfg))
    r = check_source(_pipeline(folder, "    train m on d (steps=1)\n"), str(tmp_path / "p.eff"))
    (d,) = [d for d in r.diagnostics if d.severity == "error"]
    assert d.code == "E0309" and message in d.message, d.message
    assert (d.span.line, d.span.col) == (2, 14)  # the path argument of hf(...)


def test_missing_config_and_longer_seq(ckpt, tmp_path):
    r = check_source(_pipeline(tmp_path, "    train m on d (steps=1)\n"), str(tmp_path / "p.eff"))
    assert [(d.code, "has no config.json" in d.message) for d in r.diagnostics] == [("E0309", True)]
    r = check_source(_pipeline(ckpt["llama_bias"], "    train m on d (steps=1)\n", seq=65), str(tmp_path / "p.eff"))
    (d,) = r.diagnostics
    assert "seq=65 is longer than the checkpoint's max_position_embeddings=64" in d.message
    assert (d.span.line, d.span.col) == (2, 14 + len(str(ckpt["llama_bias"])) + 2 + len(", seq="))  # at 65


def test_selectors_follow_each_familys_tree(ckpt, tmp_path):
    ok = check_source(_pipeline(ckpt["gpt2"], "    adapt m.layers[*].mlp.{up,down} with lora(rank=2)\n"
                                              "    train m on d (steps=1)\n"), str(tmp_path / "p.eff"))
    assert ok.ok, ok.diagnostics
    bad = check_source(_pipeline(ckpt["gpt2"], "    adapt m.layers[*].mlp.gate with lora(rank=2)\n"
                                               "    train m on d (steps=1)\n"), str(tmp_path / "p.eff"))
    (d,) = bad.diagnostics
    assert d.code == "E0203" and "(layers[*].mlp has: down, up)" in d.hint
    enc = check_source(_pipeline(ckpt["bert"], "    adapt m.layers[*].attn.{q,v} with lora(rank=2)\n"
                                               "    train m on d (steps=1)\n"), str(tmp_path / "p.eff"))
    # the selector is fine; an encoder learns from pairs, not from markov's stream (tests/lang/test_check_encoders.py)
    assert [d.code for d in enc.diagnostics] == ["E0405"]


def _reader(folder: Path) -> CheckpointReader:
    model = read_hf(str(folder))
    r = CheckpointReader(model, lower_arch(model.arch, None))
    r.check()
    return r


def test_unusable_weights_say_why(ckpt, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(ckpt["llama_bias"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(HFError, match=r"has shape \(80, 48\), but config.json implies \(96, 48\)"):
        _reader(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(HFError, match="cannot read .*model.safetensors") as e:
        _reader(folder)
    assert "damaged or not a safetensors file" in e.value.hint
    os.remove(folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HFError, match="pickle file, which effc never loads"):
        _reader(folder)
    with pytest.raises(HFConfigError, match="is not a folder"):
        read_hf(str(folder / "nothing"))


# ---------------------------------------------------------------- effc run: train, then export to transformers


def _run(tmp_path: Path, src: str):
    f = tmp_path / "p.eff"
    f.write_text(src)
    r = check_source(src, str(f))
    assert r.ok, r.diagnostics
    return run_pipeline(r, f, RunOptions(out=tmp_path / "run"))


def test_lora_tune_then_hf_export_loads_in_transformers_with_effcs_logits(ckpt, tmp_path):
    """LoRA on q, v and the tied head of a Qwen2 checkpoint; the merged hf export unties
    the head, and transformers' logits equal effc's on the trained (unmerged) model."""
    src = _pipeline(ckpt["qwen2_tied"], "    adapt m.layers[*].attn.{q,v} with lora(rank=4, alpha=8)\n"
                                        "    adapt m.head with lora(rank=2)\n"
                                        "    train m on d (steps=4, batch=4, optimizer=adamw(lr=1e-2))\n",
                    seq=32, data="markov(seq=32, vocab=97)") + \
        'export m to "out" (format=hf, merge_adapters=true)\n'
    _run(tmp_path, src)
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    r = check_source(src, str(tmp_path / "p.eff"))
    ir, _ = model_ir(r, "m", None)
    state = read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors")
    assert state["head.lora1.B"].abs().max() > 0  # the head's update trained
    gm, fresh = materialize(ir, 32, state, 0, output="logits")
    assert fresh == []
    x = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(T.AutoModelForCausalLM.from_pretrained(out).eval()(x).logits, gm(x),
                                   atol=1e-4, rtol=1e-4)


def test_decoder_exports_as_llama(tmp_path):
    src = ("pipeline p\nmodel m = decoder(vocab=97, dim=32, layers=2, heads=4, kv_heads=2, ffn=48, seq=16, "
           "rope_theta=1000)\ndata d = markov(seq=16, vocab=97)\nstage s:\n    train m on d (steps=2, batch=2)\n"
           'export m to "out" (format=hf)\n')
    _run(tmp_path, src)
    r = check_source(src, str(tmp_path / "p.eff"))
    ir, _ = model_ir(r, "m", None)
    gm, _ = materialize(ir, 16, read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors"), 0,
                        output="logits")
    ref = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(ref).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, gm(x), atol=1e-4, rtol=1e-4)


def test_missing_weights_at_run_time_are_a_diagnostic_at_the_model(tmp_path):
    folder = tmp_path / "cfg_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**LLAMA_70B, "vocab_size": 97, "hidden_size": 16,
                                                    "intermediate_size": 16, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "num_key_value_heads": 2}))
    with pytest.raises(RunFailed) as e:
        _run(tmp_path, _pipeline(folder, "    train m on d (steps=1)\n", seq=64))
    (d,) = e.value.diagnostics
    assert d.code == "E0504" and "has no model.safetensors" in d.message and d.span.line == 2


@pytest.mark.parametrize("name", ["gpt2", "bert", "mistral_head_dim"])
def test_hf_export_round_trips_each_family(ckpt, tmp_path, name):
    """Read, export untouched, read back with transformers: same outputs, same tensors
    (GPT-2's c_attn re-fused and transposed back; BERT's pooler carried through)."""
    _run(tmp_path, f'pipeline p\nmodel m = hf("{ckpt[name]}")\nexport m to "out" (format=hf)\n')
    a, b = load_file(ckpt[name] / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    a = {k: v for k, v in a.items() if k != "lm_head.weight" or name != "gpt2"}  # tied: written once
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == \
        json.loads((ckpt[name] / "config.json").read_text())["architectures"]


def test_large_exports_are_sharded_with_an_index_transformers_reads(ckpt, tmp_path):
    model, ir, gm = load(str(ckpt["llama_bias"]))
    files = write_hf(tmp_path, "llama", model.config, state_of(gm, ir), model.arch, max_shard_bytes=30_000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 3 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()(x).logits,
                                   _reference(ckpt["llama_bias"])(x).logits, atol=0, rtol=0)


def test_a_rewritten_checkpoint_reruns_the_stages_that_read_it(ckpt, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(ckpt["llama_bias"], folder)
    src = _pipeline(folder, "    train m on d (steps=1, batch=1)\n", seq=16, data="markov(seq=16, vocab=97)")
    def cached(summary) -> bool:
        (entry,) = [e for e in summary.stages if "cached" in e]
        return entry["cached"]

    assert not cached(_run(tmp_path, src))
    assert cached(_run(tmp_path, src))
    _write("llama_bias", folder)  # the same checkpoint written again: new files, new times
    assert not cached(_run(tmp_path, src))


def test_a_snapshot_taken_before_any_change_is_the_checkpoint(ckpt, tmp_path):
    """A stage that only evaluates an hf(...) model leaves no copy of it: `m@look` is the
    checkpoint itself, and comparing against it after LoRA training works."""
    src = _pipeline(ckpt["llama_bias"], "    eval m on d.validation (samples=2)\n", seq=16,
                    data="markov(seq=16, vocab=97)") + \
        "stage tune:\n    adapt m.layers[*].attn.q with lora(rank=2)\n" \
        "    train m on d (steps=2, batch=2, optimizer=adamw(lr=1e-2))\n" \
        "    eval m on d.validation (samples=2, against=m@s)\n"
    summary = _run(tmp_path, src)
    first, second = summary.evals
    assert second["against"]["loss"] == pytest.approx(first["loss"], abs=1e-6)
