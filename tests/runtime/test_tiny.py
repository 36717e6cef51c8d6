"""`effc init-checkpoint`: the folder must be a checkpoint transformers loads as it loads a
downloaded one (model class, tokenizer, chat template), with effc's logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer
from typer.testing import CliRunner

from effc.cli import app
from effc.runtime.hf import load
from effc.runtime.tiny import make_checkpoint

CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_transformers_loads_it_with_effcs_logits(tmp_path, family):
    folder = tmp_path / family
    cfg = make_checkpoint(folder, family, vocab=300, dim=32, layers=2, heads=4,
                          kv_heads=None if family == "gpt2" else 2, ffn=48, seq=32, seed=1)
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == CLASSES[family] and cfg["vocab_size"] <= 300
    tok = T.AutoTokenizer.from_pretrained(folder)
    text = "Return a new list of the items.\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    assert tok.decode(ids[0]) == text  # byte-level: every text round-trips
    with torch.no_grad():
        torch.testing.assert_close(load(str(folder), output="logits")[2](ids), model(ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_chat_template_is_chatml(tmp_path):
    make_checkpoint(tmp_path / "m", vocab=300, dim=16, layers=1, heads=2, ffn=16, seq=16)
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "m")
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == \
        "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    assert tok.eos_token == "<|im_end|>"
    assert len(tok.encode("<|im_end|>", add_special_tokens=False)) == 1  # a special token, one id


def test_command_refuses_an_existing_folder_and_bad_shapes(tmp_path):
    runner = CliRunner()
    (tmp_path / "there").mkdir()
    r = runner.invoke(app, ["init-checkpoint", str(tmp_path / "there")])
    assert r.exit_code == 2 and "exists; effc never overwrites a checkpoint" in r.output
    r = runner.invoke(app, ["init-checkpoint", str(tmp_path / "new"), "--dim", "30", "--heads", "4"])
    assert r.exit_code == 2 and "--heads 4 must divide --dim 30" in r.output
    assert not (tmp_path / "new").exists()
    r = runner.invoke(app, ["init-checkpoint", str(tmp_path / "ok"), "--vocab", "300", "--dim", "16",
                            "--layers", "1", "--heads", "2", "--ffn", "16", "--seq", "16"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["num_hidden_layers"] == 1
