"""Data-parallel training on PyTorch's own torch.distributed: the launcher, the process
group, the wrapping of a train step's module, and the full state behind it.

    effc run FILE --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]

- Launch: the `effc run` process (the launcher) checks the file, then starts torchrun
  (`torch.distributed.run`, in process, so its failures come back as objects, not as a
  traceback on stderr) with `-m effc run` and the same arguments; the workers find
  `EFFC_WORKER=1` in their environment and run the pipeline instead of launching again.
  One node uses torchrun's standalone rendezvous; several use `--rdzv-endpoint` (static
  rendezvous when `--node-rank` is given, so node 0 hosts it; else c10d). No restarts:
  a worker that dies ends the run, the launcher says which one, how, where the last
  checkpoint is and how to resume (`failure_message`).
- Process group (`init`): gloo for CPU tensors, NCCL for CUDA ones ("cpu:gloo,cuda:nccl"
  where CUDA exists), with a timeout (60 s, `EFFC_DIST_TIMEOUT`) so a collective whose
  peer died fails instead of waiting forever.
- Wrapping (`DataParallel`): plan.shard "none" is DDP around the module a train step
  calls; "zero2" / "zero3" are FSDP2 (`fully_shard`, reshard_after_forward off / on),
  one group a piece of the graph. effc's fx graph reads every param from its root
  (`getattr(self.layers, "0").attn.q.weight`) and never calls `layers.i` as a module, so
  the graph is split at every layer (effc.runtime.planned.forward_of with `own`) and each
  param only one piece reads is moved into that piece: `fully_shard(piece)` then
  gathers a layer's weights just before its forward and backward, and reduce-scatters
  its gradients as soon as its backward ends. Params several pieces read (a tied
  embedding and head) stay with the root's group. gm holds the sharded params (DTensors)
  while training, so the optimizer, checkpoints and `trainable(gm, ir)` see the objects
  FSDP2 updates; `unwrap` gathers them back into plain full tensors for the stages that
  follow.
- Checkpoints hold full tensors (`full`; `shard_like` cuts a process's part back out),
  so they do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.fx as fx

WORKER_ENV = "EFFC_WORKER"  # set by the launcher: this process is one of torchrun's workers
TIMEOUT_ENV = "EFFC_DIST_TIMEOUT"  # seconds a collective may wait for a peer (default 60)
LOST = 3  # the exit status of a worker whose collective failed: a peer died or did not answer in time
_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


# ---------------------------------------------------------------- the launch


@dataclass(frozen=True)
class Launch:
    nproc: int = 1  # processes on this node
    nnodes: int = 1
    node_rank: int | None = None
    endpoint: str | None = None  # HOST:PORT of the rendezvous

    @property
    def distributed(self) -> bool:
        """Whether the run needs torchrun: one process on one node runs as it always has."""
        return self.nproc > 1 or self.nnodes > 1


def launch_problems(launch: Launch) -> list[tuple[str, str]]:
    """What is wrong with the launch options, as (message, hint)."""
    out = []
    if launch.nproc < 1:
        out.append((f"--nproc {launch.nproc}: needs at least one process", "write --nproc N with N >= 1"))
    if launch.nnodes < 1:
        out.append((f"--nnodes {launch.nnodes}: needs at least one node", "write --nnodes M with M >= 1"))
    if launch.endpoint is not None:
        m = _ENDPOINT.match(launch.endpoint)
        if m is None or not 0 < int(m.group(2)) < 65536:
            out.append((f"--rdzv-endpoint {launch.endpoint}: not HOST:PORT",
                        "for example --rdzv-endpoint 10.0.0.1:29500 (a port between 1 and 65535)"))
    if launch.nnodes > 1 and launch.endpoint is None:
        out.append((f"--nnodes {launch.nnodes}: the nodes need a rendezvous",
                    "give every node the same --rdzv-endpoint HOST:PORT (a port free on HOST)"))
    if launch.node_rank is not None and not 0 <= launch.node_rank < max(launch.nnodes, 1):
        out.append((f"--node-rank {launch.node_rank}: not a node of --nnodes {launch.nnodes}",
                    f"number the nodes 0 to {max(launch.nnodes, 1) - 1}"))
    if launch.node_rank is not None and launch.nnodes == 1:
        out.append(("--node-rank needs --nnodes", "--node-rank numbers the nodes of a multi-node run"))
    return out


def torchrun_argv(launch: Launch, effc_args: list[str]) -> list[str]:
    """torchrun's command line for `effc run` with `effc_args` on every worker."""
    argv = [f"--nproc-per-node={launch.nproc}", f"--nnodes={launch.nnodes}",
            "--max-restarts=0",  # effc resumes from its own checkpoints; a restart would repeat steps silently
            "--monitor-interval=0.2"]
    if launch.endpoint is None:
        argv.append("--standalone")  # a private rendezvous on a free local port
    elif launch.node_rank is not None:  # node 0 hosts the rendezvous at the endpoint
        argv += ["--rdzv-backend=static", f"--node-rank={launch.node_rank}", f"--rdzv-endpoint={launch.endpoint}"]
    else:  # the node whose hostname is the endpoint's hosts it; ranks are assigned on arrival
        argv += ["--rdzv-backend=c10d", "--rdzv-id=effc", f"--rdzv-endpoint={launch.endpoint}"]
    return argv + ["-m", "effc", "run", *effc_args]


@dataclass(frozen=True)
class Failure:
    """How a launch ended badly: `rank` None for a stop request to the launcher itself."""

    rank: int | None
    local_rank: int | None
    pid: int | None
    exitcode: int
    signal: str | None  # the signal's name when the worker was killed by one

    @property
    def diagnosed(self) -> bool:
        """The worker reported it itself (a diagnostic, exit 1) or stopped on request (130)."""
        return self.signal is None and self.exitcode in (1, 130)


def launch(launch: Launch, effc_args: list[str]) -> Failure | None:
    """Run torchrun in this process and wait for it; None when every worker succeeded."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    env = {WORKER_ENV: "1"}
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 and warn about it; effc's --threads decides
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.nproc))
    # torchrun logs its own view of a failure; effc says it once, in its words (each
    # elastic module's logger has its own level, so the parent's would not do)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        run(parse_args(torchrun_argv(launch, effc_args)))
    except ChildFailedError as e:
        # the cause rather than its effects: torchrun stops the others with SIGTERM, and a
        # worker whose peer died exits with LOST (after one line of its own)
        rank, f = min(e.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].exitcode == LOST,
                                                          kv[1].timestamp, kv[0]))
        return Failure(rank, f.local_rank, f.pid, f.exitcode, f.signal_name() if f.exitcode < 0 else None)
    except SignalException as e:  # the launcher was asked to stop; torchrun passed the signal on
        return Failure(None, None, None, 128 + int(e.sigval), e.sigval.name)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return None


def last_checkpoint(run_folder: Path) -> tuple[int, Path] | None:
    """(step, folder) of the newest committed checkpoint of any train in a run folder."""
    found = []
    for latest in run_folder.glob("stages/*/train_*/latest"):
        m = re.fullmatch(r"step_(\d+)", latest.read_text(errors="replace").strip())
        if m and (latest.parent / m.group(0)).is_dir():
            found.append((latest.stat().st_mtime_ns, int(m.group(1)), latest.parent))
    if not found:
        return None
    _, step, folder = max(found)
    return step, folder


def failure_message(f: Failure, world: int, run_folder: Path, resume: str) -> str:
    """The launcher's account of a failed run, rustc-style: what died, the checkpoint, the fix."""
    if f.rank is None:  # asked to stop: the workers checkpoint and stop together, rank 0 has said where
        what = f"stopped by {f.signal}"
    else:
        who = f"worker {f.rank} of {world} (local rank {f.local_rank}, pid {f.pid})"
        how = (f"was killed by {f.signal}" if f.signal else
               "lost contact with another process (one of another node may have died)" if f.exitcode == LOST else
               f"exited with status {f.exitcode}")
        what = f"{who} {how}; the other workers were stopped"
    ck = last_checkpoint(run_folder)
    if ck is None:
        note = "no checkpoint had been written: --resume starts the unfinished train over (finished stages are kept)"
    else:
        note = f"the last checkpoint is step {ck[0]}, in {ck[1]}"
    return (f"{'note' if f.rank is None else 'error[E0505]'}: {what}\n"
            f"   = note: {note}\n"
            f"   = hint: resume with: {resume}  (on any number of processes: add or change --nproc N)")


# ---------------------------------------------------------------- the process group


def lost_peer(exc: BaseException) -> bool:
    """Whether an exception is a collective's failure: a peer died, or did not answer within
    the timeout (gloo raises a plain RuntimeError naming itself)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text))


def worker() -> bool:
    """Whether this process is one of torchrun's workers started by `launch`."""
    return os.environ.get(WORKER_ENV) == "1" and "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "cpu") -> None:
    """Join the process group (a no-op outside a worker, or when already joined). With
    `device` "cuda" each process takes the GPU of its local rank."""
    if not worker() or dist.is_initialized():
        return
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"  # each collective goes where its tensors are
    dist.init_process_group(backend, timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "60"))))


def init_single(device: str = "cpu") -> None:
    """A process group of this process alone, for FSDP2 with one process (offload); a
    no-op where a group exists. Its store lives in memory: nothing listens on a port."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "60"))))


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if worker() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 alone writes files and reports."""
    return rank() == 0


def barrier() -> None:
    """Where a rank reads what rank 0 wrote, or rank 0 changes what others read."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------- wrapping a train step


class DataParallel:
    """A train step's module wrapped for `plan.shard` across the process group. `module`
    is what the step calls; `evaluator` what evaluation during training calls. For FSDP2
    (zero2, zero3) `forward` is effc.runtime.planned.forward_of(gm, plan, own=True): the
    split whose pieces own their params."""

    def __init__(self, gm: fx.GraphModule, forward: torch.nn.Module, shard: str, offload: bool = False):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
        from torch.nn.parallel import DistributedDataParallel

        self.rank, self.world, self.shard = dist.get_rank(), dist.get_world_size(), shard
        self.gm = gm
        if shard == "none":
            # DDP broadcasts rank 0's params at construction (the same on every rank: the
            # model is built from the seed); buffers (rotary tables) are constants
            device = next(gm.parameters()).device
            self.module = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None,
                                                  forward_sync_buffers=False)
            self.evaluator = gm
            return
        device = next(gm.parameters()).device
        mesh = init_device_mesh(device.type, (self.world,))
        # forward is the graph split at every layer, each piece owning the params only it
        # reads (effc.runtime.planned.forward_of(own=True)): one FSDP2 group a piece, and
        # the root's for the params several pieces share (a tied embedding and head)
        gm_names: dict[int, list[str]] = {}
        for name, p in gm.named_parameters(remove_duplicate=False):
            gm_names.setdefault(id(p), []).append(name)
        names = {name: gm_names[id(p)] for name, p in forward.named_parameters(remove_duplicate=False)}
        # offload: the shards (and gradients, and so AdamW's state) in host memory, pinned
        # beside a GPU so copies to it run asynchronously
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
        for piece in sorted({name.split(".", 1)[0] for name in forward.meta["owners"]}):
            fully_shard(forward.get_submodule(piece), mesh=mesh, reshard_after_forward=shard == "zero3",
                        offload_policy=policy)
        fully_shard(forward, mesh=mesh, reshard_after_forward=shard == "zero3", offload_policy=policy)
        # gm holds the sharded params from now on, so the optimizer, checkpoints and
        # `trainable` see the objects FSDP2 updates, and the full originals are freed
        for name, p in forward.named_parameters(remove_duplicate=False):
            for target in names[name]:
                owner, _, leaf = target.rpartition(".")
                setattr(gm.get_submodule(owner) if owner else gm, leaf, p)
        self.module = self.evaluator = forward

    def no_sync(self, last: bool):
        """The context of one micro-batch: gradients are reduced only in the last one's backward."""
        if self.shard == "none":
            return contextlib.nullcontext() if last else self.module.no_sync()
        self.module.set_requires_gradient_sync(last, recurse=True)
        return contextlib.nullcontext()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks, in float64."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def unwrap(self) -> None:
        """Put plain, full tensors back into gm (every rank, in the same order: gathering
        is a collective) so the stages after training read an ordinary graph."""
        if self.shard == "none":
            return
        done: dict[int, torch.nn.Parameter] = {}
        for name, p in list(self.gm.named_parameters(remove_duplicate=False)):
            if id(p) not in done:
                done[id(p)] = torch.nn.Parameter(full(p).detach().clone(), requires_grad=p.requires_grad)
            owner, _, leaf = name.rpartition(".")
            setattr(self.gm.get_submodule(owner) if owner else self.gm, leaf, done[id(p)])


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a process's shard (a collective for a DTensor)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A full tensor `t` cut as `like` is, on its device: this rank's shard for a DTensor
    (no communication: every rank holds `t`), `t` itself otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return t.to(like.device)
    return distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def effc_command(file: Path, args: list[str]) -> str:
    """How a person would type `effc run FILE ARGS` (quoted for a POSIX shell)."""
    import shlex

    return " ".join(["effc", "run", shlex.quote(str(file)), *map(shlex.quote, args)])
