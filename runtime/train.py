"""The training loop of a `train` statement: AdamW, a warm-up schedule, clipping,
gradient accumulation, seeded, checkpointed, and resumable bit for bit.

Exactness rests on three rules:
- the batch of step s is a pure function of (data seed, s) (`data.batch`), so a resumed
  run reads the same samples without any saved data-loader state;
- dropout draws from `torch.manual_seed(step_seed(seed, s))` set at every step, so no
  random-generator state needs saving;
- a checkpoint holds every trainable param and AdamW's full state (step, both moments)
  in safetensors, bit for bit; the learning rate is a function of s.
At the same thread count, a run resumed from step s therefore computes the same floats as
an uninterrupted one (tests/runtime/test_resume.py checks it, kills included).

One optimizer step: `batch` sequences in `accumulate` micro-batches (sizes differ by at
most one); each micro-batch's summed loss is divided by the step's total target count
before backward, so the gradient is that of the mean loss over the whole batch.
A sentence encoder trains on `batch` (anchor, positive) pairs a step with the
in-batch-negatives contrastive loss (`runtime/contrastive.py`), per pair instead of per
token; its negatives come from the micro-batch (`_pair_step`).
Structured so that later issues can change how a micro-batch is computed (activation
checkpointing, precision, several processes) without touching the loop.

Data parallelism (`dp`, effc.runtime.distributed.DataParallel; `effc run --nproc N`):
every rank reads the step's whole batch (a pure function of the seed and s), keeps its
contiguous share (sizes differing by at most one, like micro-batches) and splits that
into micro-batches; gradients are reduced once a step, in the last micro-batch's
backward. Each summed loss is divided by the *global* target count and multiplied by
the world size, undoing DDP's and FSDP2's averaging, so the gradient is the 1-process
one up to the order of float additions. The reported loss is the global mean (the
ranks' sums all-reduced, with the stop flag, so every rank stops at the same step).
Clipping sees the global norm (DDP: the gradients are already equal everywhere; FSDP2:
clip_grad_norm_ on DTensors reduces the norm). Checkpoints hold full tensors, gathered
from every rank and written by rank 0 alone, so a run resumes on any number of
processes: the curve continues, but not bit for bit on another world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx

from effc.compiler.ir import IR
from effc.runtime import data as D
from effc.runtime.checkpoint import load_latest, save_checkpoint
from effc.runtime.contrastive import pair_loss_sum
from effc.runtime.distributed import full, is_main, shard_like
from effc.runtime.evaluate import evaluate, evaluate_pairs
from effc.runtime.memory import LiveBytes
from effc.runtime.model import device_of, trainable


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch: int
    accumulate: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    schedule: str  # constant | linear | cosine
    warmup: int
    clip: float | None
    seed: int
    checkpoint_every: int | None
    eval_every: int | None

    @staticmethod
    def from_options(o: dict) -> "TrainSpec":
        opt, sched = o["optimizer"], o["schedule"]
        return TrainSpec(o["steps"], o["batch"], o["accumulate"], float(opt.args["lr"]),
                         tuple(float(b) for b in opt.args["betas"]), float(opt.args["weight_decay"]),
                         sched.name, int(sched.args.get("warmup", 0)), o["clip"], o["seed"],
                         o["checkpoint_every"], o["eval_every"])


class Interrupted(Exception):
    """Training stopped on request (SIGTERM, Ctrl-C) after writing a checkpoint."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped at step {step}")
        self.step, self.checkpoint = step, checkpoint


def lr_at(s: int, spec: TrainSpec) -> float:
    """Learning rate of step s (0-based): linear warm-up to lr over `warmup` steps, then
    constant, or decay to zero (linear, or cosine as in SGDR) over the remaining steps."""
    if s < spec.warmup:
        return spec.lr * (s + 1) / spec.warmup
    if spec.schedule == "constant":
        return spec.lr
    progress = (s - spec.warmup) / max(1, spec.steps - spec.warmup)
    if spec.schedule == "linear":
        return spec.lr * (1.0 - progress)
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, s: int) -> int:
    return int.from_bytes(hashlib.sha256(f"step:{seed}:{s}".encode()).digest()[:8], "little") >> 1


def micro_sizes(batch: int, accumulate: int) -> list[int]:
    base, extra = divmod(batch, accumulate)
    return [base + (i < extra) for i in range(accumulate) if base + (i < extra) > 0]


def _optimizer(params: list[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.AdamW:
    # foreach=False: one code path on every machine, so a resumed run repeats the same arithmetic
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay,
                             foreach=False)


def _save(root: Path, s: int, named, opt, meta: dict) -> Path:
    """Every rank calls it (gathering a sharded tensor is a collective); rank 0 writes,
    from host memory (a model training on a GPU is copied back)."""
    tensors = {}
    for path, p in named:
        tensors[f"param/{path}"] = full(p.detach()).cpu()
        for k, v in opt.state.get(p, {}).items():
            tensors[f"adam/{path}/{k}"] = full(v).cpu()
    if not is_main():
        return root / f"step_{s:08d}"  # the folder rank 0 commits
    return save_checkpoint(root, s, tensors, {**meta, "step": s})


def _restore(ckpt, named, opt) -> None:
    """Full tensors into params and AdamW state, each rank keeping its shard of them, on
    the params' device (AdamW's `step` stays on the CPU, where AdamW keeps it)."""
    with torch.no_grad():
        for path, p in named:
            p.copy_(shard_like(p, ckpt.tensors[f"param/{path}"]))
            state = {k: (t if k == "step" else shard_like(p, t)).clone()
                     for k in ("step", "exp_avg", "exp_avg_sq")
                     if (t := ckpt.tensors.get(f"adam/{path}/{k}")) is not None}
            if state:
                opt.state[p] = state


@dataclass
class Hooks:
    """How the loop reports: each callback gets a JSON-ready dict."""

    on_start: Callable[[int, dict], None] = lambda step, meta: None  # resumed step (0: fresh), checkpoint meta
    on_step: Callable[[dict], None] = lambda m: None
    on_eval: Callable[[dict], None] = lambda m: None
    should_stop: Callable[[], bool] = lambda: False


def _sync(dp, i: int, sizes: list[int]):
    """The context of micro-batch i: with several processes, gradients are reduced in the last one only."""
    return dp.no_sync(i == len(sizes) - 1) if dp is not None else contextlib.nullcontext()


def _lm_step(gm, data: D.Dataset, spec: TrainSpec, s: int, sizes: list[int], amp, dp, first: int,
             dev: torch.device) -> tuple[float, int, int]:
    """Forward and backward of step s of a language model: (summed loss, target count of
    the whole step, tokens read). `gm` is the step's forward (the plan's: checkpointed,
    compiled), `amp` makes the context its forwards run in (autocast, or none). With
    several processes (`dp`) this rank computes sequences first..first+sum(sizes) of the
    step's batch, and the summed loss is its part. The batch goes to `dev`."""
    seq = data.seq
    ids = D.batch_windows(data.train, seq, s, spec.batch, spec.seed)
    x, y = D.gather(data.train, seq, ids)
    packed = D.packing(data.train, seq, ids)  # records' boundaries, for data made of records
    count = int((y != -100).sum())  # of the whole batch: every rank reads it, no communication
    x, y, packed = x.to(dev), y.to(dev), packed and [t.to(dev) for t in packed]
    scale = 1
    if dp is not None:  # this rank's share; DDP and FSDP2 average gradients over the ranks
        share = slice(first, first + sum(sizes))
        x, y, packed, scale = x[share], y[share], packed and [t[share] for t in packed], dp.world
    extras = [t.split(sizes) for t in packed] if packed else []
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i, (xm, ym) in enumerate(zip(x.split(sizes), y.split(sizes))):
        with _sync(dp, i, sizes):
            with amp():
                part = gm(xm, ym, *(e[i] for e in extras))
            (part.float() / max(count, 1) * scale).backward()
        total += part.detach().double()
    return float(total), count, x.numel()


def _pair_step(gm, data: D.Pairs, spec: TrainSpec, s: int, sizes: list[int], amp, dp, first: int,
               dev: torch.device) -> tuple[float, int, int]:
    """Forward and backward of step s of a sentence encoder: (summed contrastive loss, pair
    count of the whole step, real tokens read); `dp`, `first` and `dev` as in `_lm_step`. Each
    micro-batch's summed loss (`pair_loss_sum`) is divided by the step's pair count, so with accumulate=1 the gradient is exactly that of
    sentence-transformers' MultipleNegativesRankingLoss on the batch. Under accumulation
    a pair's negatives are the other positives of *its micro-batch*, not of the whole
    batch (each micro-batch's graph is freed before the next runs): the step's loss is
    the mean over pairs of that per-micro-batch loss, and its chance level is
    log(micro-batch size)."""
    ids_B = D.pair_batch(data.train, s, spec.batch, spec.seed)
    scale = 1
    if dp is not None:
        ids_B, scale = ids_B[first: first + sum(sizes)], dp.world
    total = torch.zeros((), dtype=torch.float64, device=dev)
    tokens = 0
    for i, ids_M in enumerate(ids_B.split(sizes)):
        a, keep_a, p, keep_p = (t.to(dev) for t in D.gather_pairs(data.train, ids_M))
        with _sync(dp, i, sizes):
            with amp():
                part = pair_loss_sum(gm, a, keep_a, p, keep_p)
            (part.float() / spec.batch * scale).backward()
        total += part.detach().double()
        tokens += int(keep_a.sum() + keep_p.sum())
    return float(total), spec.batch, tokens


def train(gm: fx.GraphModule, ir: IR, data: D.Dataset | D.Pairs, spec: TrainSpec, ckpt_root: Path,
          resume: bool, hooks: Hooks, eval_batch: int = 8, forward=None, amp=contextlib.nullcontext,
          dp=None, measure: bool = False, device: torch.device | None = None) -> dict:
    """Train `gm` in place; returns the summary of the run (last loss, tokens, time).
    `data` is a `Dataset` for a language model (the graph returns its summed
    cross-entropy) or `Pairs` for a sentence encoder (the graph returns embeddings, and
    the loss is the contrastive one of `_pair_step`). `forward` is what a train step
    calls instead of `gm` (an execution plan's: effc.runtime.planned.forward_of; it
    shares gm's params), and each forward runs in the context `amp()` (autocast). `dp`:
    the process group's DataParallel (`forward` is then its module), None for one process.
    `measure`: count the live tensor bytes of this run's second step
    (effc.runtime.memory.LiveBytes; the step runs slower under it) and return their peak
    as "tensor_peak". `device`: where the batches go (default: where gm's params are;
    under offload they are in host memory while the forward runs on the device)."""
    named = trainable(gm, ir)
    # A pruned weight that trains keeps its zeros (its storage is "sparse"): the mask is
    # read off the weight before any step, its gradient is masked (so clipping sees only
    # the kept weights) and the step's update is masked again (AdamW's moments would
    # otherwise move the zeros).
    sparse = {p.path for p in ir.params() if p.storage.startswith("sparse") and p.trainable}
    masks = [(w, w.detach() != 0) for path, w in named if path in sparse]
    opt = _optimizer([p for _, p in named], spec)
    start, meta = 0, {}
    if resume and (ckpt := load_latest(ckpt_root)) is not None:
        _restore(ckpt, named, opt)
        start, meta = ckpt.step, ckpt.meta
    hooks.on_start(start, meta)
    gm.train()
    sizes, first, evaluated = micro_sizes(spec.batch, spec.accumulate), 0, gm
    if dp is not None:
        # this rank's share of the batch, in as many micro-batches as every other rank
        # runs (FSDP2 gathers params in each forward): no more than the smallest share holds
        shares = micro_sizes(spec.batch, dp.world)
        sizes = micro_sizes(shares[dp.rank], min(spec.accumulate, shares[-1]))
        first, evaluated = sum(shares[:dp.rank]), dp.evaluator
    pairs = isinstance(data, D.Pairs)
    device = device or device_of(gm)
    loss = float("nan")
    tokens, t0 = 0, time.perf_counter()
    tensor_peak = None  # `measure`: the tensor-level peak of one step
    for s in range(start, spec.steps):
        meter = contextlib.nullcontext()
        if measure and s == start + 1:  # the second step: the optimizer's state exists by then
            # a GPU's memory only (the prediction's), all of it on a CPU
            meter = LiveBytes(resizes=dp is not None and dp.shard != "none",
                              device=None if device.type == "cpu" else device.type)
            for t in [*gm.parameters(), *gm.buffers(),
                      *(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))]:
                meter.track(t)
        with meter:
            # each rank draws its own dropout masks (rank 0 those of a 1-process run's first micro-batch)
            torch.manual_seed(step_seed(spec.seed, s) + (dp.rank if dp is not None else 0))
            lr = lr_at(s, spec)
            for group in opt.param_groups:
                group["lr"] = lr
            total, count, n_tokens = (_pair_step if pairs else _lm_step)(forward or gm, data, spec, s, sizes, amp,
                                                                        dp, first, device)
            if dp is not None:  # the global sums, and whether any rank was asked to stop
                total, n_tokens, asked = dp.sum([total, n_tokens, float(hooks.should_stop())])
                n_tokens = int(n_tokens)
            loss = total / max(count, 1)
            for w, m in masks:
                if w.grad is not None:
                    w.grad.mul_(m)
            if spec.clip is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], spec.clip, foreach=False)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for w, m in masks:
                    w.mul_(m)
        if isinstance(meter, LiveBytes):
            tensor_peak = meter.peak
        tokens += n_tokens
        elapsed = time.perf_counter() - t0
        hooks.on_step({"step": s + 1, "loss": loss, "lr": lr, "tokens_per_s": tokens / max(elapsed, 1e-9),
                       "elapsed_s": elapsed})
        done = s + 1
        if spec.eval_every and done % spec.eval_every == 0 and done < spec.steps:
            # every rank evaluates (FSDP2's forward gathers params); rank 0 reports
            result = evaluate_pairs(evaluated, data.validation, eval_batch) if pairs else \
                evaluate(evaluated, data.validation, data.seq, eval_batch)
            hooks.on_eval({"step": done, **result})
            gm.train()
        # a finished run just finishes
        stop = (asked > 0 if dp is not None else hooks.should_stop()) and done < spec.steps
        if stop or (spec.checkpoint_every and done % spec.checkpoint_every == 0 and done < spec.steps):
            path = _save(ckpt_root, done, named, opt, {"threads": torch.get_num_threads(),
                                                       "world": dp.world if dp is not None else 1})
            if stop:
                raise Interrupted(done, path)
    return {"steps": spec.steps, "loss": loss, "tokens": tokens, "seconds": time.perf_counter() - t0,
            "tensor_peak": tensor_peak}
