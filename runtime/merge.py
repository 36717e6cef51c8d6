"""Model merging: one state from several states of the same architecture.

`model soup = ties(a@s1, b@s2, base=a@s0, density=0.5)` calls these. Every method takes
the operands' states (canonical path -> tensor) and returns a new one:
- linear: the weighted mean (or sum) of the parameters ("model soups");
- task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic",
  arXiv:2212.04089): base + scale * sum_i w_i tau_i with task vectors tau_i = theta_i - base;
- TIES (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
  arXiv:2306.01708): trim each tau_i to its largest-magnitude entries, elect each entry's
  sign by the summed mass, and average only the trimmed values that agree with it;
- DARE (Yu et al. 2024, "Language Models are Super Mario", arXiv:2311.03099): drop each
  entry of tau_i with probability p and rescale the rest by 1 / (1 - p), so each task
  vector is unchanged in expectation, then add them as task arithmetic does.

Floating-point tensors are merged in float32 (float64 when an operand is float64) and
stored in the first model's dtype. Any other tensor (an index, a quantized tensor) has no
meaningful average: it must be equal in every operand and is copied.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable

import torch

State = dict[str, torch.Tensor]


class MergeError(Exception):
    """Operands or arguments that cannot be merged; message and hint are shown to the user as is."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message, self.hint = message, hint


def _check(operands: list[tuple[str, State]]) -> None:
    """Same keys, shapes and kinds everywhere, and equal non-float tensors; the error names
    the first differing path in the first model's order."""
    (first_name, first), rest = operands[0], operands[1:]
    for path, t in first.items():
        for name, state in rest:
            other = state.get(path)
            if other is None:
                raise MergeError(f"{path} is in {first_name} but not in {name}",
                                 "merged models must have the same parameters: the same architecture and adapters")
            if other.shape != t.shape:
                raise MergeError(f"{path} has shape {tuple(t.shape)} in {first_name} and {tuple(other.shape)} "
                                 f"in {name}", "merged models must have the same architecture and sizes")
            if other.is_floating_point() != t.is_floating_point() or (
                    not t.is_floating_point() and (other.dtype != t.dtype or not torch.equal(other, t))):
                raise MergeError(f"{path} is a {t.dtype} tensor in {first_name} that differs in {name}",
                                 "only floating-point tensors are merged; others (indices, quantized "
                                 "weights) must be equal in every model: merge before quantizing")
    for name, state in rest:
        extra = next((path for path in state if path not in first), None)
        if extra is not None:
            raise MergeError(f"{extra} is in {name} but not in {first_name}",
                             "merged models must have the same parameters: the same architecture and adapters")


def _merge(models: list[State], base: State | None,
           combine: Callable[[str, list[torch.Tensor], torch.Tensor | None], torch.Tensor]) -> State:
    """Checks the operands and calls combine(path, model tensors, base tensor or None) on
    every float path, in the working dtype."""
    operands = [(f"model {i}", m) for i, m in enumerate(models)] + ([("base", base)] if base is not None else [])
    _check(operands)
    out = {}
    with torch.no_grad():
        for path, t in models[0].items():
            if not t.is_floating_point():
                out[path] = t.clone()
                continue
            tensors = [state[path] for _, state in operands]
            work = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
            thetas = [x.to(t.device, work) for x in tensors[:len(models)]]
            b = base[path].to(t.device, work) if base is not None else None
            out[path] = combine(path, thetas, b).to(t.dtype)
    return out


def _weights(weights: list[float] | None, n: int) -> list[float]:
    """One weight per model, 1 each by default; every method starts here."""
    if n == 0:
        raise MergeError("nothing to merge", "name at least one model")
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} models", "give one weight per model")
    return [float(w) for w in weights]


def _weighted_sum(weights: list[float], taus: list[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(torch.add, (w * tau for w, tau in zip(weights, taus)))


def linear(models: list[State], weights: list[float] | None = None, normalize: bool = True) -> State:
    """sum_i w_i theta_i, divided by sum_i w_i when normalize (weights default to 1 each)."""
    w = _weights(weights, len(models))
    total = sum(w) if normalize else 1.0
    if total == 0:
        raise MergeError("the merge weights sum to 0, so they cannot be normalized",
                         "use normalize=false or other weights")
    return _merge(models, None, lambda path, thetas, _: _weighted_sum(w, thetas) / total)


def task_arithmetic(models: list[State], base: State, scale: float = 1.0,
                    weights: list[float] | None = None) -> State:
    """base + scale * sum_i w_i (theta_i - base), weights default to 1 each."""
    w = _weights(weights, len(models))
    return _merge(models, base, lambda path, thetas, b: b + scale * _weighted_sum(w, [t - b for t in thetas]))


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """tau with all but its k = floor(density * numel + 0.5) largest |entries| zeroed (round
    half up); among equal magnitudes the lower flat index stays."""
    flat = tau.flatten()
    top = torch.sort(flat.abs(), descending=True, stable=True).indices[:math.floor(density * flat.numel() + 0.5)]
    out = torch.zeros_like(flat)
    out[top] = flat[top]
    return out.view_as(tau)


def ties(models: list[State], base: State, density: float, scale: float = 1.0,
         weights: list[float] | None = None) -> State:
    """TIES per tensor: trimmed tau_i (the top `density` of entries by |tau_i|, as `_trim`
    rounds), elected sign s = sign(sum_i w_i trimmed tau_i), and base + scale * the
    w-weighted mean of the trimmed tau_i whose entry has sign s (0 where none has).
    With the default weights (1 each) this is the paper's disjoint mean; weights must be > 0."""
    if not 0.0 <= density <= 1.0:
        raise MergeError(f"density={density} is out of range",
                         "density is the fraction of each task vector kept, in [0, 1]")
    w = _weights(weights, len(models))
    if any(x <= 0 for x in w):
        raise MergeError(f"ties weights must be positive, got {w}", "a weight scales a model's share of each mean")

    def combine(path, thetas, b):
        taus = torch.stack([_trim(t - b, density) for t in thetas])
        wt = torch.tensor(w, dtype=taus.dtype, device=taus.device).view(-1, *[1] * b.dim())
        elected = torch.sign((wt * taus).sum(0))
        agree = (torch.sign(taus) == elected) & (taus != 0)
        mass = (wt * agree).sum(0)
        merged = (wt * taus * agree).sum(0) / mass.masked_fill(mass == 0, 1.0)  # 0 where none agree
        return b + scale * merged

    return _merge(models, base, combine)


def _dare_seed(seed: int, path: str, operand: int) -> int:
    """A 63-bit seed for one tensor of one operand: independent of every other and of order."""
    digest = hashlib.sha256(f"{seed}:{path}:{operand}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dare(models: list[State], base: State, drop: float, rescale: bool = True, seed: int = 0,
         weights: list[float] | None = None) -> State:
    """base + sum_i w_i tau~_i, tau~_i = tau_i with each entry dropped with probability
    `drop` (kept ones divided by 1 - drop when rescale). The drop pattern comes from a CPU
    generator seeded by (seed, path, operand index) alone, so it does not depend on the
    dict's order or on the other tensors."""
    if not 0.0 <= drop < 1.0:
        raise MergeError(f"drop={drop} is out of range", "drop is the probability of dropping an entry, in [0, 1)")
    w = _weights(weights, len(models))

    def combine(path, thetas, b):
        taus = []
        for i, t in enumerate(thetas):
            g = torch.Generator().manual_seed(_dare_seed(seed, path, i))
            kept = (torch.rand(t.shape, generator=g) >= drop).to(t.device)
            tau = (t - b) * kept
            taus.append(tau / (1.0 - drop) if rescale else tau)
        return b + 1.0 * _weighted_sum(w, taus)  # task_arithmetic's arithmetic, so drop=0 equals it exactly

    return _merge(models, base, combine)
