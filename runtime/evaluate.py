"""Evaluation: loss and perplexity over a split, and the similarity of two models.

- loss: the mean cross-entropy (nats) per target token over the evaluated sequences;
- perplexity: exp(loss);
- similarity: the mean, over target positions, of the cosine similarity of two models'
  next-token probability vectors (1 for identical predictions, near 0 for models that
  put their probability on different tokens).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from effc.runtime import data as D


def _batches(split: D.Split, seq: int, batch: int, samples: int | None):
    """(inputs, targets, packing args) in stream order; the packing args are (segments,
    positions) for data made of records, else empty."""
    for ids in D.eval_windows(split, seq, batch, samples):
        x, y = D.gather(split, seq, ids)
        yield x, y, D.packing(split, seq, ids) or ()


@torch.no_grad()
def evaluate(gm: fx.GraphModule, split: D.Split, seq: int, batch: int, samples: int | None = None) -> dict:
    was_training = gm.training
    gm.eval()
    total, count, seqs = 0.0, 0, 0
    for x, y, packed in _batches(split, seq, batch, samples):
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
    for x, y, packed in _batches(split, seq, batch, samples):
        keep = (y != -100).flatten()
        pa = a(x, *packed).flatten(0, 1)[keep].softmax(-1)
        pb = b(x, *packed).flatten(0, 1)[keep].softmax(-1)
        total += float(torch.nn.functional.cosine_similarity(pa, pb, dim=-1).double().sum())
        count += int(keep.sum())
    return total / max(count, 1)
