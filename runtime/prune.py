"""Pruning: which weights, attention heads, MLP channels and sublayers a model can lose.

Pure tensor functions that `prune SEL with METHOD(...)` calls; weights are (out, in) as in
torch.nn.Linear. A mask is a bool tensor of its weight's shape, True = kept.

Unstructured, one mask per weight:
- magnitude: the floor(sparsity * numel) smallest |w| go, per tensor or over all the
  given tensors together (global);
- N:M: in every group of m consecutive input columns of a row the n highest scores stay,
  the pattern sparse tensor cores run (2:4);
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
  Models", arXiv:2306.11695): score |W_ij| * ||X_j||_2, X_j the j-th input feature over
  every calibration token, compared within each output row (Wanda's comparison group),
  or fed to N:M.
Every selection is a stable sort, so ties are broken by index order and every count is
exact; each function says which way.

Structured, shrinking the tensors so the model gets smaller:
- attention heads: the unit is a kv group (one k/v head with the heads // kv_heads query
  heads that read it), so grouped-query attention keeps consistent shapes; with
  kv_heads == heads each head is its own group;
- MLP channels: rows of gate/up and columns of down (SwiGLU or GELU);
- whole sublayers (He et al. 2024, "What Matters in Transformers? Not All Attention is
  Needed", arXiv:2406.15786): a sublayer whose output residual stream is most similar
  (cosine) to its input changes the least and is dropped first.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

EPS = 1e-8  # as torch.nn.functional.cosine_similarity: a zero vector has similarity 0


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _drop_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat mask of a flat score with its k lowest entries removed, lower index first among equals."""
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    mask[torch.sort(score, stable=True).indices[:k]] = False
    return mask


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                    scope: str = "tensor") -> dict[str, torch.Tensor]:
    """Masks removing the floor(sparsity * n) smallest |w|, with n each tensor's numel
    (scope="tensor") or all the tensors' numel together (scope="global"). Among equal |w|
    the lower flat index goes first (global: the earlier tensor in the dict)."""
    _check_fraction("sparsity", sparsity)
    if scope == "tensor":
        return {path: _drop_lowest(w.detach().abs().flatten(), math.floor(sparsity * w.numel())).view(w.shape)
                for path, w in weights.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
    if not weights:
        return {}
    dtype = functools.reduce(torch.promote_types, (w.dtype for w in weights.values()))
    flat = torch.cat([w.detach().abs().flatten().to(dtype) for w in weights.values()])
    kept = _drop_lowest(flat, math.floor(sparsity * flat.numel())).split([w.numel() for w in weights.values()])
    return {path: k.view(w.shape) for (path, w), k in zip(weights.items(), kept)}


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the n highest scores in every group of m consecutive input columns of each row
    (among equal scores the lower column is kept)."""
    if score.dim() != 2:
        raise ValueError(f"N:M needs an (out, in) score, got shape {tuple(score.shape)}")
    if not 0 <= n <= m or m < 1:
        raise ValueError(f"N:M needs 0 <= n <= m and m >= 1, got n={n}, m={m}")
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M with m={m} needs the input width to be a multiple of {m}, got {cols}")
    groups = score.detach().reshape(rows, cols // m, m)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.zeros(groups.shape, dtype=torch.bool, device=score.device).scatter_(-1, top, True).view(rows, cols)


def _token_weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One weight per token of x (..., features): the mask's (1 = a real token) or all ones."""
    if mask is None:
        return torch.ones(x.shape[:-1].numel(), dtype=torch.float64, device=x.device)
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match tokens of shape {tuple(x.shape[:-1])}")
    return mask.detach().reshape(-1).to(torch.float64)


class ActivationNorms:
    """Wanda's ||X_j||_2: the L2 norm of each input feature over every calibration token.

    `update(x, mask=None)` with a linear layer's input x (..., in); a mask (x.shape[:-1],
    1 = a real token) leaves padding out. Sums of squares are kept in float64 so many
    batches lose nothing."""

    def __init__(self):
        self._squares: torch.Tensor | None = None

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        w = _token_weights(x, mask)
        squares = (x.detach().reshape(-1, x.shape[-1]).to(torch.float64).square() * w[:, None]).sum(0)
        if self._squares is None:
            self._squares = squares
        elif self._squares.shape != squares.shape:
            raise ValueError(f"input width changed from {self._squares.numel()} to {squares.numel()}")
        else:
            self._squares += squares

    def result(self) -> torch.Tensor:
        """The norms, (in,) float32."""
        if self._squares is None:
            raise ValueError("no calibration batch was seen")
        return self._squares.sqrt().float()


def wanda_scores(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, the weight's shape."""
    if act_norm.shape != (w.shape[1],):
        raise ValueError(f"act_norm of shape {tuple(act_norm.shape)} does not match a weight of shape {tuple(w.shape)}")
    return w.detach().abs() * act_norm[None, :].to(w.device)


def wanda_mask(w: torch.Tensor, act_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Removes the floor(sparsity * in) lowest Wanda scores of every output row (among
    equal scores the lower column goes first)."""
    _check_fraction("sparsity", sparsity)
    score = wanda_scores(w, act_norm)
    drop = torch.sort(score, dim=1, stable=True).indices[:, :math.floor(sparsity * w.shape[1])]
    return torch.ones(w.shape, dtype=torch.bool, device=w.device).scatter_(1, drop, False)


def wanda_nm_mask(w: torch.Tensor, act_norm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M on the Wanda scores."""
    return nm_mask(wanda_scores(w, act_norm), n, m)


def choose_keep(scores: torch.Tensor, n_remove: int) -> list[int]:
    """The indices of all but the n_remove lowest scores, ascending; among equal scores the
    lower index is kept. At least one unit must stay."""
    if not 0 <= n_remove < scores.numel():
        raise ValueError(f"can remove 0 to {scores.numel() - 1} of {scores.numel()} units, not {n_remove}")
    order = torch.sort(scores.detach().flatten(), descending=True, stable=True).indices
    return sorted(order[:scores.numel() - n_remove].tolist())


def _check_keep(keep: list[int], units: int, what: str) -> torch.Tensor:
    if not keep or any(b <= a for a, b in itertools.pairwise(keep)) or keep[0] < 0 or keep[-1] >= units:
        raise ValueError(f"keep must list distinct {what} of 0..{units - 1} in ascending order, got {keep}")
    return torch.tensor(keep, dtype=torch.long)


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """The rows of each unit when units are consecutive blocks of `size` rows."""
    return (units[:, None] * size + torch.arange(size)).flatten()


# ---------------------------------------------------------------------------- attention heads


class HeadNorms:
    """The mean L2 norm of each query head's attention output, over calibration tokens.

    `update(z, mask=None)` with the o projection's input z (..., heads * head_dim), the
    heads' outputs side by side; the result is `head_scores`' head_out_norm."""

    def __init__(self, heads: int):
        self.heads = heads
        self._sum = torch.zeros(heads, dtype=torch.float64)
        self._tokens = 0.0

    def update(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if z.shape[-1] % self.heads:
            raise ValueError(f"width {z.shape[-1]} is not a multiple of heads={self.heads}")
        w = _token_weights(z, mask)
        norms = z.detach().reshape(-1, self.heads, z.shape[-1] // self.heads).to(torch.float64).norm(dim=-1)
        self._sum += (norms * w[:, None]).sum(0).cpu()
        self._tokens += float(w.sum())

    def result(self) -> torch.Tensor:
        """(heads,) float32."""
        if self._tokens == 0:
            raise ValueError("no calibration token was seen")
        return (self._sum / self._tokens).float()


def _need(tensors: dict[str, torch.Tensor], leaves: tuple[str, ...]) -> None:
    missing = [leaf for leaf in leaves if leaf not in tensors]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} among {sorted(tensors)}")


def _check_attention(q, k, v, o, heads: int, kv_heads: int, head_dim: int) -> None:
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    dim = q.shape[1]
    want = {"q": (heads * head_dim, dim), "k": (kv_heads * head_dim, dim), "v": (kv_heads * head_dim, dim),
            "o": (dim, heads * head_dim)}
    for name, t in zip("qkvo", (q, k, v, o)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name}.weight has shape {tuple(t.shape)}, expected {want[name]} for "
                             f"heads={heads}, kv_heads={kv_heads}, head_dim={head_dim}")


def _block_squares(w: torch.Tensor, n: int) -> torch.Tensor:
    """The sum of squares of each of w's n equal blocks of rows, (n,) float32 on the CPU."""
    return w.detach().float().reshape(n, -1).square().sum(1).cpu()


def head_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, heads: int,
                kv_heads: int, head_dim: int, head_out_norm: torch.Tensor | None = None) -> torch.Tensor:
    """One score per kv group, (kv_heads,) float32; higher = more important.

    Without calibration it is a magnitude proxy: the sum of squared weights in the group's
    q, k and v rows and o columns. With head_out_norm (heads,), `HeadNorms`' result, it is
    the sum over the group's query heads h of head_out_norm[h] * ||o[:, cols of h]||_F,
    the size of what the heads add to the residual stream."""
    _check_attention(q, k, v, o, heads, kv_heads, head_dim)
    per = heads // kv_heads
    o_heads = _block_squares(o.t(), heads)
    if head_out_norm is not None:
        if head_out_norm.shape != (heads,):
            raise ValueError(f"head_out_norm must have shape ({heads},), got {tuple(head_out_norm.shape)}")
        return (head_out_norm.float().cpu() * o_heads.sqrt()).reshape(kv_heads, per).sum(1)
    kv = _block_squares(k, kv_heads) + _block_squares(v, kv_heads)
    return (_block_squares(q, heads) + o_heads).reshape(kv_heads, per).sum(1) + kv


def prune_heads(tensors: dict[str, torch.Tensor], heads: int, kv_heads: int, head_dim: int,
                keep: list[int]) -> dict[str, torch.Tensor]:
    """The attention's tensors by leaf (q.weight, k.weight, v.weight, o.weight and any of
    q.bias, k.bias, v.bias, o.bias) with only the kv groups in `keep` (ascending): the
    result has len(keep) * heads // kv_heads query heads and len(keep) kv heads."""
    _need(tensors, ("q.weight", "k.weight", "v.weight", "o.weight"))
    _check_attention(*(tensors[f"{n}.weight"] for n in "qkvo"), heads, kv_heads, head_dim)
    groups = _check_keep(keep, kv_heads, "kv groups")
    kv_rows = _expand(groups, head_dim)
    q_rows = _expand(_expand(groups, heads // kv_heads), head_dim)
    out = {}
    for leaf, t in tensors.items():
        if leaf in ("q.weight", "q.bias"):
            out[leaf] = t.index_select(0, q_rows.to(t.device))
        elif leaf in ("k.weight", "k.bias", "v.weight", "v.bias"):
            out[leaf] = t.index_select(0, kv_rows.to(t.device))
        elif leaf == "o.weight":
            out[leaf] = t.index_select(1, q_rows.to(t.device))
        elif leaf == "o.bias":  # lives in the model's width, which stays
            out[leaf] = t.clone()
        else:
            raise ValueError(f"unexpected attention tensor {leaf!r}")
    return out


# ---------------------------------------------------------------------------- MLP channels


def _check_mlp(tensors: dict[str, torch.Tensor]) -> int:
    """The intermediate width."""
    _need(tensors, ("up.weight", "down.weight"))
    up, down = tensors["up.weight"], tensors["down.weight"]
    ffn, dim = up.shape
    if tuple(down.shape) != (dim, ffn) or ("gate.weight" in tensors and tensors["gate.weight"].shape != up.shape):
        raise ValueError(f"inconsistent MLP shapes: {({k: tuple(t.shape) for k, t in tensors.items()})}")
    return ffn


def channel_scores(tensors: dict[str, torch.Tensor], act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """One score per intermediate channel, (ffn,) float32; higher = more important.

    Tensors by leaf: gate.weight (SwiGLU only), up.weight, down.weight, biases ignored.
    Without calibration ||down[:, c]|| * ||gate[c]|| * ||up[c]|| (no gate factor for GELU):
    how much a unit input can reach the output through the channel. With act_norm (ffn,),
    the calibrated L2 norm of the channel's activation (down's input), act_norm[c] *
    ||down[:, c]||: what the channel actually writes."""
    ffn = _check_mlp(tensors)
    out_norm = tensors["down.weight"].detach().float().norm(dim=0)
    if act_norm is not None:
        if act_norm.shape != (ffn,):
            raise ValueError(f"act_norm must have shape ({ffn},), got {tuple(act_norm.shape)}")
        return (act_norm.float().to(out_norm.device) * out_norm).cpu()
    in_norm = tensors["up.weight"].detach().float().norm(dim=1)
    if "gate.weight" in tensors:
        in_norm = in_norm * tensors["gate.weight"].detach().float().norm(dim=1)
    return (out_norm * in_norm).cpu()


def prune_channels(tensors: dict[str, torch.Tensor], keep: list[int]) -> dict[str, torch.Tensor]:
    """The MLP's tensors by leaf (gate.weight, up.weight, down.weight and any of their
    biases) with only the channels in `keep` (ascending): rows of gate and up, columns of down."""
    ffn = _check_mlp(tensors)
    channels = _check_keep(keep, ffn, "channels")
    out = {}
    for leaf, t in tensors.items():
        if leaf in ("gate.weight", "gate.bias", "up.weight", "up.bias"):
            out[leaf] = t.index_select(0, channels.to(t.device))
        elif leaf == "down.weight":
            out[leaf] = t.index_select(1, channels.to(t.device))
        elif leaf == "down.bias":  # lives in the model's width, which stays
            out[leaf] = t.clone()
        else:
            raise ValueError(f"unexpected MLP tensor {leaf!r}")
    return out


# ---------------------------------------------------------------------------- sublayers


class SublayerSimilarity:
    """The mean over calibration tokens of cos(x_in, x_out), the residual stream before and
    after one sublayer (attention or MLP, residual add included).

    `update(x_in, x_out, mask=None)` with (..., dim) tensors; a mask (x.shape[:-1]) weights
    each token (1 = real, 0 = padding)."""

    def __init__(self):
        self._sum = 0.0
        self._weight = 0.0

    def update(self, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if x_in.shape != x_out.shape:
            raise ValueError(f"x_in {tuple(x_in.shape)} and x_out {tuple(x_out.shape)} differ in shape")
        w = _token_weights(x_in, mask)
        a = x_in.detach().reshape(-1, x_in.shape[-1]).to(torch.float64)
        b = x_out.detach().reshape(-1, x_out.shape[-1]).to(torch.float64)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(EPS)
        self._sum += float((cos * w).sum())
        self._weight += float(w.sum())

    def result(self) -> float:
        if self._weight == 0:
            raise ValueError("no calibration token was seen")
        return self._sum / self._weight


def choose_drop(similarities: dict[str, float], count: int) -> list[str]:
    """The `count` sublayers with the highest similarity (the least important), most
    similar first; among equal similarities the earlier one in the dict goes first."""
    if not 0 <= count <= len(similarities):
        raise ValueError(f"can drop 0 to {len(similarities)} sublayers, not {count}")
    return sorted(similarities, key=lambda name: -similarities[name])[:count]
