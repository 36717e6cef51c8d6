"""format=peft and peft("dir"), with PEFT itself as the reference.

Export: effc trains LoRA, DoRA and IA3 adapters on a tiny Llama checkpoint that
transformers wrote (with biases on q, k, v and the MLP, so DoRA's and IA3's handling of
a bias matters), exports format=peft, and `peft.PeftModel.from_pretrained` must give
effc's logits (1e-5) and count as many trainable parameters as effc's cost table.
Import: PEFT creates the adapters (`get_peft_model`), their weights are perturbed and
saved, `adapt m with peft("dir")` imports them, and effc's logits must equal PEFT's.
"""

from __future__ import annotations

import json
from collections import ChainMap
from pathlib import Path

import peft
import pytest
import torch
import transformers as T

from effc.compiler.pipeline import compile_checked, model_ir
from effc.lang.check import check_source
from effc.lang.hf import read_hf
from effc.runtime.checkpoint import read_tensors
from effc.runtime.hf import CheckpointReader
from effc.runtime.model import materialize
from effc.runtime.peft import read_peft
from effc.runtime.run import RunOptions, adapter_args, run_pipeline

VOCAB, SEQ = 97, 16


def _config():
    return T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft") / "llama"
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return folder


def _pipeline(folder, body):
    return (f'pipeline p\nmodel m = hf("{folder}", seq={SEQ})\ndata d = markov(seq={SEQ}, vocab={VOCAB})\n'
            f"stage s:\n{body}")


def _tokens():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


EXPORTS = {
    "lora": "    adapt m.layers[*].attn.{q,v} with lora(rank=4, alpha=8)\n"
            "    adapt m.layers[0].mlp.down with lora(rank=2)\n    adapt m.head with lora(rank=3, alpha=1)\n",
    "dora": "    adapt m.layers[*].attn.{q,k} with dora(rank=4, alpha=8)\n    adapt m.layers[1].mlp.up with dora(rank=2)\n",
    "ia3": "    adapt m.layers[*].attn.{k,v} with ia3()\n    adapt m.layers[*].mlp.down with ia3()\n",
    "rslora": "    adapt m.layers[*].attn.{q,v} with lora(rank=4, alpha=8, rslora=true)\n"
              "    adapt m.layers[1].mlp.up with lora(rank=2, alpha=8, rslora=true)\n",
    "prompt": "    adapt m with prompt(length=4)\n",
}
PEFT_TYPE = {"lora": "LORA", "dora": "LORA", "rslora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_peft_loads_effcs_export_with_effcs_logits_and_parameter_count(ckpt, tmp_path, kind):
    src = _pipeline(ckpt, EXPORTS[kind] + "    train m on d (steps=3, batch=2, optimizer=adamw(lr=2e-2))\n") + \
        'export m to "out" (format=peft)\n'
    f = tmp_path / "p.eff"
    f.write_text(src)
    r = check_source(src, str(f))
    assert r.ok, r.diagnostics
    run_pipeline(r, f, RunOptions(out=tmp_path / "run"))
    out = tmp_path / "out"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(ckpt)  # the base is still the checkpoint's
    assert cfg["peft_type"] == PEFT_TYPE[kind]
    if kind == "lora":
        assert cfg["r"] == 4 and cfg["rank_pattern"] == {"model.layers.0.mlp.down_proj": 2, "lm_head": 3}
        assert cfg["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 2.0, "lm_head": 1.0}
    if kind == "ia3":
        assert cfg["feedforward_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert cfg.get("use_rslora", False) == (kind == "rslora")

    ir, _ = model_ir(r, "m", None)
    state = read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors")
    gm, fresh = materialize(ir, SEQ, state, 0, output="logits")
    assert fresh == []
    base = T.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    x = _tokens()
    with torch.no_grad():
        plain = base(x).logits
        # is_trainable=True makes PEFT count trainable params as training would; PEFT refuses it for prompts
        pm = peft.PeftModel.from_pretrained(base, out, is_trainable=kind != "prompt").eval()
        want, got = pm(x).logits[:, -SEQ:], gm(x)  # a prompt's virtual positions come first
    assert (got - plain).abs().max() > 1e-3  # the adapters changed the function
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    trainable = pm.get_nb_trainable_parameters()[0] if kind != "prompt" else pm.prompt_encoder["default"].embedding.weight.numel()
    assert trainable == compile_checked(r).builds[0].cost.params_trainable


def _peft_adapter(ckpt, folder: Path, config):
    torch.manual_seed(1)
    pm = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(ckpt), config)
    with torch.no_grad():  # far from the identity init: every tensor matters
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(p + torch.randn_like(p) * (0.2 if "ia3" in name or "magnitude" in name else 0.1))
    pm.save_pretrained(folder)
    return pm.eval()


IMPORTS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                    rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3}),
    "dora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj"], use_dora=True),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_rslora=True,
                                      rank_pattern={"down_proj": 2}),
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
}


@pytest.mark.parametrize("kind", sorted(IMPORTS))
def test_peft_adapters_import_with_peft_logits(ckpt, tmp_path, kind):
    pm = _peft_adapter(ckpt, tmp_path / "adapter", IMPORTS[kind]())
    src = _pipeline(ckpt, f'    adapt m with peft("{tmp_path / "adapter"}")\n    train m on d (steps=1)\n')
    r = check_source(src, str(tmp_path / "p.eff"))
    assert r.ok, r.diagnostics
    info = r.models["m"]
    assert {u.technique for u in info.adapters} == {"lora" if kind == "rslora" else kind}
    assert all(u.args.get("rslora", False) == (kind == "rslora") for u in info.adapters)
    ir, _ = model_ir(r, "m", None)
    base = CheckpointReader(read_hf(str(ckpt), SEQ), ir)
    gm, fresh = materialize(ir, SEQ, ChainMap(base, read_peft(ir, adapter_args(info, ir), "llama")), 0,
                            output="logits")
    assert fresh == []
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), pm(x).logits[:, -SEQ:], atol=1e-5, rtol=1e-5)
    assert compile_checked(r).builds[0].cost.params_trainable == pm.get_nb_trainable_parameters()[0]


def test_import_then_export_round_trips_through_a_run(ckpt, tmp_path):
    """adapt with peft, train, export format=peft: PEFT reads back what effc trained."""
    _peft_adapter(ckpt, tmp_path / "adapter", IMPORTS["dora"]())
    src = _pipeline(ckpt, f'    adapt m with peft("{tmp_path / "adapter"}")\n'
                          "    train m on d (steps=2, batch=2, optimizer=adamw(lr=1e-2))\n") + \
        'export m to "out" (format=peft)\n'
    f = tmp_path / "p.eff"
    f.write_text(src)
    r = check_source(src, str(f))
    run_pipeline(r, f, RunOptions(out=tmp_path / "run"))
    ir, _ = model_ir(r, "m", None)
    state = read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors")
    gm, _ = materialize(ir, SEQ, state, 0, output="logits")
    pm = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(ckpt), tmp_path / "out").eval()
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), pm(x).logits, atol=1e-5, rtol=1e-5)


def test_a_trained_base_is_written_beside_the_adapter(tmp_path):
    """The built-in decoder has no checkpoint: the export writes it as a Llama in base/."""
    src = ("pipeline p\nmodel m = decoder(vocab=97, dim=32, layers=1, heads=4, ffn=48, seq=16)\n"
           "data d = markov(seq=16, vocab=97)\nstage s:\n    train m on d (steps=2, batch=2)\n"
           "    adapt m.layers[*].attn.{q,v} with lora(rank=2)\n    train m on d (steps=2, batch=2, optimizer=adamw(lr=1e-2))\n"
           'export m to "out" (format=peft)\n')
    f = tmp_path / "p.eff"
    f.write_text(src)
    r = check_source(src, str(f))
    assert r.ok, r.diagnostics
    run_pipeline(r, f, RunOptions(out=tmp_path / "run"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "out" / "base")
    ir, _ = model_ir(r, "m", None)
    gm, _ = materialize(ir, 16, read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors"), 0,
                        output="logits")
    pm = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base"),
                                        tmp_path / "out").eval()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), pm(x).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- what the checker refuses


def _codes(src):
    return [(d.code, d.message) for d in check_source(src).diagnostics if d.severity.value == "error"]


GPT2 = lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=SEQ)  # noqa: E731


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2") / "gpt2"
    T.AutoModelForCausalLM.from_config(GPT2()).save_pretrained(folder)
    return folder


def test_export_refusals(ckpt, gpt2):
    end = 'export m to "out" (format=peft)\n'
    cases = {
        "fused c_attn": (_pipeline(gpt2, "    adapt m.layers[0].attn.q with lora(rank=2)\n    train m on d (steps=1)\n"),
                         "fused attention projection"),
        "mixed kinds": (_pipeline(ckpt, "    adapt m.layers[0].attn.q with lora(rank=2)\n"
                                        "    adapt m.layers[0].attn.v with dora(rank=2)\n    train m on d (steps=1)\n"),
                        "dora and lora adapters"),
        "no adapters": (_pipeline(ckpt, "    train m on d (steps=1)\n"), "has no adapters"),
        "dropouts": (_pipeline(ckpt, "    adapt m.layers[0].attn.q with lora(rank=2, dropout=0.1)\n"
                                     "    adapt m.layers[0].attn.v with lora(rank=2)\n    train m on d (steps=1)\n"),
                     "one lora_dropout"),
    }
    for name, (src, words) in cases.items():
        codes = _codes(src + end)
        assert [c for c, _ in codes] == ["E0407"] and words in codes[0][1], (name, codes)
    merged = _codes(_pipeline(ckpt, "    adapt m.layers[0].attn.q with lora(rank=2)\n    train m on d (steps=1)\n")
                    + 'export m to "out" (format=peft, merge_adapters=true)\n')
    assert [c for c, _ in merged] == ["E0407"]
    ok = _pipeline(gpt2, "    adapt m.layers[0].mlp.{up,down} with lora(rank=2)\n    train m on d (steps=1)\n") + end
    assert check_source(ok).ok


def test_import_refusals(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4}))
    (tmp_path / "pissa").mkdir()
    (tmp_path / "pissa" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"], "init_lora_weights": "pissa_niter_4"}))
    for folder, words in (("empty", "no adapter_config.json"), ("prefix", "PREFIX_TUNING"),
                          ("pissa", "init_lora_weights='pissa_niter_4'")):
        codes = _codes(_pipeline(ckpt, f'    adapt m with peft("{tmp_path / folder}")\n    train m on d (steps=1)\n'))
        assert [c for c, _ in codes] == ["E0408"] and words in codes[0][1], codes
    part = _codes(_pipeline(ckpt, f'    adapt m.layers[0] with peft("{tmp_path / "pissa"}")\n    train m on d (steps=1)\n'))
    assert [c for c, _ in part] == ["E0206"]


# ---------------------------------------------------------------- PiSSA against PEFT's own initialisation


def test_pissa_init_equals_peft_and_exports_its_residual_base(ckpt, tmp_path):
    """lora(init=pissa): the adapter's B A and the residual base weight equal PEFT's
    init_lora_weights="pissa" on the same checkpoint; the untrained model computes the
    checkpoint's function; after training, format=peft writes the residual base in base/
    and PEFT loads both with effc's logits."""
    body = "    adapt m.layers[*].attn.{q,v} with lora(rank=4, alpha=8, init=pissa)\n"
    src = _pipeline(ckpt, body + "    train m on d (steps=2, batch=2, optimizer=adamw(lr=1e-2))\n") + \
        'export m to "out" (format=peft)\n'
    f = tmp_path / "p.eff"
    f.write_text(src)
    r = check_source(src, str(f))
    assert r.ok, r.diagnostics
    ir, _ = model_ir(r, "m", None)
    base = CheckpointReader(read_hf(str(ckpt), SEQ), ir)
    gm, fresh = materialize(ir, SEQ, base, 0, adapter_args(r.models["m"], ir), output="logits")
    assert len(fresh) == 2 * 2 * 2  # A and B of q and v in two layers
    ref = peft.get_peft_model(T.AutoModelForCausalLM.from_pretrained(ckpt),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights="pissa")).eval()
    names = dict(ref.named_parameters())
    for i in range(2):
        for ours, theirs in (("q", "q_proj"), ("v", "v_proj")):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{theirs}"
            ba = gm.get_parameter(f"layers.{i}.attn.{ours}.lora0.B") @ gm.get_parameter(f"layers.{i}.attn.{ours}.lora0.A")
            want = names[f"{prefix}.lora_B.default.weight"] @ names[f"{prefix}.lora_A.default.weight"]
            torch.testing.assert_close(ba, want, atol=2e-5, rtol=1e-4)  # sign-free: SVD vectors may flip
            torch.testing.assert_close(gm.get_parameter(f"layers.{i}.attn.{ours}.weight"),
                                       names[f"{prefix}.base_layer.weight"], atol=2e-5, rtol=1e-4)
    x = _tokens()
    with torch.no_grad():
        plain = T.AutoModelForCausalLM.from_pretrained(ckpt).eval()(x).logits
        torch.testing.assert_close(gm(x), plain, atol=1e-5, rtol=1e-5)  # W_res + s B A = W
    run_pipeline(r, f, RunOptions(out=tmp_path / "run"))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "out" / "base")  # the residual, not the checkpoint
    state = read_tensors(tmp_path / "run" / "stages" / "00_s" / "models" / "m.safetensors")
    trained, _ = materialize(ir, SEQ, state, 0, output="logits")
    pm = peft.PeftModel.from_pretrained(T.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base"),
                                        tmp_path / "out").eval()
    with torch.no_grad():
        got, want = trained(x), pm(x).logits
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
