"""Evaluation: loss and perplexity over a split, and the similarity of two models.

- loss: the mean cross-entropy (nats) per target token over the evaluated sequences;
- perplexity: exp(loss);
- similarity: the mean, over target positions, of the cosine similarity of two models'
  next-token probability vectors (1 for identical predictions, near 0 for models that
  put their probability on different tokens).

Sentence encoders (graphs that return embeddings) are evaluated on (anchor, positive)
pairs instead (`evaluate_pairs`, `embedding_similarity`):
- loss: the in-batch-negatives contrastive loss (`runtime/contrastive.py`) of the
  evaluated pairs taken as *one* batch, so each anchor's negatives are all the other
  evaluated positives and chance is log N nats for N pairs (independent of how the
  embeddings are batched);
- accuracy: the fraction of anchors whose own positive is the most similar of the N
  (top-1 retrieval among the evaluated pairs; chance is 1/N);
- similarity: the mean cosine similarity of two encoders' embeddings of the same texts
  (every evaluated anchor and positive; 1 for identical embeddings).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from effc.runtime import data as D
from effc.runtime.contrastive import retrieval
from effc.runtime.model import device_of


def _batches(split: D.Split, seq: int, batch: int, samples: int | None):
    """(inputs, targets, packing args) in stream order; the packing args are (segments,
    positions) for data made of records, else empty."""
    for ids in D.eval_windows(split, seq, batch, samples):
        x, y = D.gather(split, seq, ids)
        yield x, y, D.packing(split, seq, ids) or ()


def _on(dev, x, y, packed):
    return x.to(dev), y.to(dev), tuple(t.to(dev) for t in packed)


@torch.no_grad()
def evaluate(gm: fx.GraphModule, split: D.Split, seq: int, batch: int, samples: int | None = None) -> dict:
    was_training = gm.training
    gm.eval()
    total, count, seqs = 0.0, 0, 0
    dev = device_of(gm)
    for x, y, packed in _batches(split, seq, batch, samples):
        x, y, packed = _on(dev, x, y, packed)
        total += float(gm(x, y, *packed).double())
        count += int((y != -100).sum())
        seqs += x.shape[0]
    gm.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "sequences": seqs}


@torch.no_grad()
def similarity(a: fx.GraphModule, b: fx.GraphModule, split: D.Split, seq: int, batch: int,
               samples: int | None = None) -> float:
    """`a` and `b` are logits graphs (`to_fx(..., output="logits")`)."""
    a.eval(), b.eval()
    total, count = 0.0, 0
    dev = device_of(a)
    for x, y, packed in _batches(split, seq, batch, samples):
        x, y, packed = _on(dev, x, y, packed)
        keep = (y != -100).flatten()
        pa = a(x, *packed).flatten(0, 1)[keep].softmax(-1)
        pb = b(x, *packed).flatten(0, 1)[keep].softmax(-1)
        total += float(torch.nn.functional.cosine_similarity(pa, pb, dim=-1).double().sum())
        count += int(keep.sum())
    return total / max(count, 1)


@torch.no_grad()
def embed(gm: fx.GraphModule, texts: D.Sentences, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(len(ids), D) embeddings of texts `ids`, `batch` texts per forward pass."""
    was_training = gm.training
    gm.eval()
    dev = device_of(gm)
    out = [gm(*(t.to(dev) for t in D.padded(texts, chunk))) for chunk in ids.split(batch)]
    gm.train(was_training)
    return torch.cat(out)


def _evaluated(split: D.PairSplit, samples: int | None) -> torch.Tensor:
    return torch.arange(len(split) if samples is None else min(len(split), samples))


@torch.no_grad()
def pair_embeddings(gm: fx.GraphModule, split: D.PairSplit, batch: int, samples: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchors, positives), (N, D) each: an encoder's embeddings of the first `samples`
    pairs (all by default)."""
    ids = _evaluated(split, samples)
    return embed(gm, split.anchors, ids, batch), embed(gm, split.positives, ids, batch)


def pair_metrics(a_ND: torch.Tensor, p_ND: torch.Tensor) -> dict:
    """Loss and top-1 retrieval accuracy of N pairs' embeddings taken as one batch (see
    the module docstring)."""
    total, hits = retrieval(a_ND, p_ND)
    n = a_ND.shape[0]
    return {"loss": total / max(n, 1), "accuracy": hits / max(n, 1), "pairs": n}


def evaluate_pairs(gm: fx.GraphModule, split: D.PairSplit, batch: int, samples: int | None = None) -> dict:
    """An encoder's `pair_metrics` on the first `samples` pairs of `split` (all by default)."""
    return pair_metrics(*pair_embeddings(gm, split, batch, samples))


@torch.no_grad()
def embedding_similarity(x: tuple[torch.Tensor, torch.Tensor], y: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The mean cosine similarity of two encoders' embeddings of the same texts: `x` and
    `y` are their `pair_embeddings` of the same pairs (2N texts)."""
    cos_2N = torch.nn.functional.cosine_similarity(torch.cat(x), torch.cat(y), dim=-1)
    return float(cos_2N.double().mean()) if cos_2N.numel() else 0.0
