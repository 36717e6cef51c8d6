"""The objective of sentence encoders: in-batch negatives, as sentence-transformers'
`MultipleNegativesRankingLoss` computes it with its defaults (scale 20, cosine
similarity, directions=("query_to_doc",), no hard negatives).

For B (anchor, positive) pairs with embeddings a_i and p_j, the logits are
s_ij = SCALE * cos(a_i, p_j), and pair i's loss is the cross-entropy of row i against
column i, -log softmax_j(s_ij)[i]: each anchor must pick its own positive out of the B
positives, the other B-1 being its negatives. Chance is log B nats; SCALE = 20 is a
temperature of 0.05 (Henderson et al. 2017, arXiv:1705.00652; sentence-transformers'
default). Both functions here return the *sum* over anchors, so that accumulation and
evaluation divide by the exact pair count, as the language models' summed
cross-entropy does.

Shape legend: B pairs in a batch, N pairs evaluated, D embedding width, C a chunk of
anchors, S the longest text of a batch's side.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

SCALE = 20.0
CHUNK = 1024  # anchors per similarity block in `retrieval`: N x 1024 floats, never N x N


def contrastive_sum(a_BD: torch.Tensor, p_BD: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """The summed in-batch-negatives loss of B pairs (see the module docstring)."""
    s_BB = scale * (F.normalize(a_BD, dim=-1) @ F.normalize(p_BD, dim=-1).T)
    return F.cross_entropy(s_BB, torch.arange(a_BD.shape[0], device=s_BB.device), reduction="sum")


def pair_loss_sum(gm: fx.GraphModule, a_BS: torch.Tensor, keep_a_BS: torch.Tensor,
                  p_BS: torch.Tensor, keep_p_BS: torch.Tensor) -> torch.Tensor:
    """One micro-batch: the encoder graph embeds both sides (two forward passes, as
    sentence-transformers runs one per column), then `contrastive_sum`."""
    return contrastive_sum(gm(a_BS, keep_a_BS), gm(p_BS, keep_p_BS))


@torch.no_grad()
def retrieval(a_ND: torch.Tensor, p_ND: torch.Tensor, scale: float = SCALE) -> tuple[float, int]:
    """The N pairs taken as one batch: (summed contrastive loss, hits), where a hit is an
    anchor whose own positive is the most similar of all N positives (ties go to the
    lower index, as argmax breaks them). Computed in blocks of CHUNK anchors."""
    a_ND, p_ND = F.normalize(a_ND, dim=-1), F.normalize(p_ND, dim=-1)
    total, hits = 0.0, 0
    for lo in range(0, a_ND.shape[0], CHUNK):
        rows_C = torch.arange(lo, min(lo + CHUNK, a_ND.shape[0]), device=a_ND.device)
        s_CN = scale * (a_ND[rows_C] @ p_ND.T)
        total += float(F.cross_entropy(s_CN, rows_C, reduction="sum").double())
        hits += int((s_CN.argmax(dim=1) == rows_C).sum())
    return total, hits
