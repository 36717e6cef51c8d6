"""Measured memory of a training step, at the tensor level: the yardstick for the cost
model's byte counts (`compiler/cost.py`).

On CPU torch keeps no allocator statistics, so `LiveBytes` counts storages instead: a
TorchDispatchMode sees every aten op below autograd, forward, backward and optimizer
alike, and registers each distinct untyped storage an op returns. A storage is keyed by
its StorageImpl (`_cdata`), so views, in-place results and a tied head reading the
embedding's weight count once. A `weakref.finalize` on the storage's Python object
removes it when the storage is freed: torch keeps that object alive for as long as any
tensor holds the storage (checked by tests/runtime/test_memory.py), so the callback fires
exactly when the bytes are released. Meta tensors own no memory and are ignored.

What it cannot see: scratch memory a kernel allocates and frees inside one op (never
returned as a tensor), and allocator overhead (rounding, caching). Both are outside the
cost model too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every distinct untyped storage created by an op while the mode
    is active (plus storages registered with `track`), removes them when the storage is
    freed, and records the peak. Counts freeze when the mode exits."""

    def __init__(self, resizes: bool = False, device: str | None = None):
        """`resizes`: re-read every live storage's size before each op, for code that frees
        memory by resizing a storage to zero outside aten (FSDP2's unsharded parameters);
        slower, linear in the live storages. `device`: count only storages on that device
        type ("cuda": a GPU's memory, leaving out what offload keeps in host memory)."""
        super().__init__()
        self.device = device
        self.bytes = 0
        self.peak = 0
        self.resizes = resizes
        self._live: dict[int, tuple[int, weakref.finalize]] = {}  # _cdata -> (nbytes, finalizer)

    def track(self, t: torch.Tensor) -> None:
        """Count an existing tensor's storage (params, optimizer state, inputs); once only."""
        self._add(t)

    def reset_peak(self) -> None:
        self.peak = self.bytes

    def _add(self, t: torch.Tensor) -> None:
        # A DTensor (FSDP2) is a wrapper whose storage is not memory: its shard on this
        # process is (the local ops that make it run below this mode, unseen).
        t = getattr(t, "_local_tensor", t)
        if t.device.type == "meta" or t.layout is not torch.strided or self.device not in (None, t.device.type):
            return
        st = t.untyped_storage()
        key, n = st._cdata, st.nbytes()
        if key in self._live:  # seen before; an op with out= may have resized it
            old, fin = self._live[key]
            self._live[key] = (n, fin)
            self.bytes += n - old
        else:
            self._live[key] = (n, weakref.finalize(st, self._free, key))
            self.bytes += n
        self.peak = max(self.peak, self.bytes)

    def _free(self, key: int) -> None:
        n, _ = self._live.pop(key)
        self.bytes -= n

    def _resync(self) -> None:
        for key, (n, fin) in list(self._live.items()):
            got = fin.peek()
            if got is not None and (m := got[0].nbytes()) != n:
                self._live[key] = (m, fin)
                self.bytes += m - n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.resizes:
            self._resync()
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def __exit__(self, *exc):
        # The finalizers would otherwise keep this tracker alive as long as the params.
        for _, fin in self._live.values():
            fin.detach()
        return super().__exit__(*exc)


@dataclass(frozen=True)
class StepMemory:
    baseline: int  # bytes live before forward: params + buffers + optimizer state + inputs
    activations: int  # live bytes right after forward minus baseline (what autograd saved, + the loss)
    peak: int  # the highest live bytes during forward + backward + optimizer.step + zero_grad
    weights: int  # distinct storages of the params (a tied param counts once)
    optimizer: int  # the optimizer's state tensors (AdamW: two moments and a step per param)


def _distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def warm_adamw(gm: fx.GraphModule, tokens: torch.Tensor, targets: torch.Tensor) -> torch.optim.AdamW:
    """AdamW over the graph's trainable params after one full step on (tokens, targets):
    its state exists, so a `measure_step` that follows measures the steady state."""
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3, foreach=False)
    gm(tokens, targets).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def measure_step(gm: fx.GraphModule, params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer,
                 tokens: torch.Tensor, targets: torch.Tensor) -> StepMemory:
    """One full training step of `gm` (forward, loss.backward(), optimizer.step(),
    zero_grad(set_to_none=True)) under a `LiveBytes`. `params` are all the model's weights,
    frozen ones included. The caller runs a warm-up step first (`warm_adamw`), so that the
    optimizer's state exists and the step measures steady state rather than its lazy creation."""
    params = list(params)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with LiveBytes() as live:
        for t in [*params, *gm.buffers(), *state, tokens, targets]:
            live.track(t)
        baseline = live.bytes
        loss = gm(tokens, targets)
        activations = live.bytes - baseline
        loss.backward()
        del loss  # its graph is gone after backward; free it as a training loop would
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = live.peak
    return StepMemory(baseline, activations, peak, _distinct_bytes(params), _distinct_bytes(state))
