"""Compressed models through `effc run` and out through every export format, checked by the
libraries that read them: transformers loads format=hf and format=compressed_tensors with
the logits of effc's own graph, compressed-tensors decompresses to effc's dequantized
weights, format=effc stores shared and packed tensors once, a merged export keeps a pruned
weight's zeros, and a merge of snapshots is the merge of their states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from effc.compiler.pipeline import model_ir
from effc.lang.check import check_file
from effc.runtime import merge as M
from effc.runtime.model import dense_state, materialize
from effc.runtime.run import RunOptions, run_pipeline

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINE = """\
pipeline c
model tiny = decoder(vocab=256, dim=64, layers=4, heads=4, ffn=128, seq=32)
data corpus = stdlib_text(seq=32)
stage pretrain:
    train tiny on corpus (steps=8, batch=4, optimizer=adamw(lr=3e-3))
stage tune:
    train tiny on corpus (steps=2, batch=4, optimizer=adamw(lr=3e-3))
stage compress:
    share tiny.layers[0:4] as recursive(blocks=2)
    adapt tiny.layers[*].attn.{q,v} with lora(rank=4, per_loop=true)
    prune tiny.layers[*].attn.o with magnitude(sparsity=0.5)
    quantize tiny.layers[*].mlp.** to int4(group=32)
    train tiny on corpus (steps=3, batch=4)
model soup = ties(tiny@tune, tiny@pretrain, base=tiny@pretrain, density=0.5)
export tiny to "out/effc"
export tiny to "out/hf" (format=hf, merge_adapters=true)
export tiny to "out/ct" (format=compressed_tensors, merge_adapters=true)
export soup to "out/soup" (format=effc)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compress")
    f = folder / "c.eff"
    f.write_text(PIPELINE)
    r = check_file(str(f))
    assert r.ok, r.diagnostics
    run_pipeline(r, f, RunOptions(out=folder / "run"))
    return folder, r


def _final(folder: Path, stage: str, model: str = "tiny") -> dict:
    return load_file(folder / "run" / "stages" / stage / "models" / f"{model}.safetensors")


def _tokens():
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


def _effc_logits(r, folder):
    ir, _ = model_ir(r, "tiny", None)
    gm, fresh = materialize(ir, 32, _final(folder, "02_compress"), 0, output="logits")
    assert fresh == []
    with torch.no_grad():
        return gm(_tokens()), ir


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("fmt", ["hf", "ct"])
def test_transformers_reads_the_export_with_effcs_logits(run, fmt):
    folder, r = run
    want, _ = _effc_logits(r, folder)
    kw = {"quantization_config": T.CompressedTensorsConfig(dequantize=True)} if fmt == "ct" else {}
    model = T.AutoModelForCausalLM.from_pretrained(folder / "out" / fmt, **kw).eval()
    with torch.no_grad():
        got = model(_tokens()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compressed_tensors_decompresses_to_effcs_dequantized_weights(run):
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    folder, r = run
    ir = _effc_logits(r, folder)[1]
    dense = dense_state(ir, _final(folder, "02_compress"))
    got = CompressedTensorsDequantizer(folder / "out" / "ct", dtype=torch.float32).validate(
        load_file(folder / "out" / "ct" / "model.safetensors"))
    for i in range(4):
        torch.testing.assert_close(got[f"model.layers.{i}.mlp.down_proj.weight"], dense[f"layers[{i}].mlp.down.weight"],
                                   rtol=0, atol=0)


def test_effc_export_stores_packed_and_shared_tensors_once(run):
    folder, _ = run
    tensors = load_file(folder / "out" / "effc" / "model.safetensors")
    assert not any(k.startswith(("layers[2].", "layers[3].")) for k in tensors)  # loops read their blocks
    assert tensors["layers[0].mlp.up.qweight"].dtype == torch.uint8
    assert "layers[0].mlp.up.weight" not in tensors
    adapters = load_file(folder / "out" / "effc" / "adapters.safetensors")
    assert {k.split(".")[0] for k in adapters} == {f"layers[{i}]" for i in range(4)}  # per-loop: one per layer
    meta = json.loads((folder / "out" / "effc" / "effc.json").read_text())
    assert meta["merged"] is False


def test_merged_export_keeps_the_pruned_zeros(run):
    folder, _ = run
    state = _final(folder, "02_compress")
    hf = load_file(folder / "out" / "hf" / "model.safetensors")
    for i in range(4):
        block = i % 2
        zeros = state[f"layers[{block}].attn.o.weight"] == 0
        assert zeros.float().mean() == pytest.approx(0.5)
        assert torch.equal(hf[f"model.layers.{i}.self_attn.o_proj.weight"] == 0, zeros)


def test_merge_of_snapshots_is_the_merge_of_their_states(run):
    folder, r = run
    pre, tune = _final(folder, "00_pretrain"), _final(folder, "01_tune")
    want = M.ties([tune, pre], pre, density=0.5)
    assert not torch.equal(want["layers[0].attn.q.weight"], pre["layers[0].attn.q.weight"])
    got = load_file(folder / "out" / "soup" / "model.safetensors")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_generate_rebuilds_the_compressed_export_and_its_decoder_equals_the_graph(run):
    from effc.runtime.generate import load
    folder, r = run
    want, _ = _effc_logits(r, folder)  # the fx graph's logits over 32 tokens
    x = _tokens()
    dec = load(folder / "out" / "effc").decoder
    torch.testing.assert_close(dec.step(x[:, :31]), want[:, :31], rtol=1e-5, atol=1e-5)  # the prompt
    torch.testing.assert_close(dec.step(x[:, 31:]), want[:, 31:], rtol=1e-5, atol=1e-5)  # one cached step
