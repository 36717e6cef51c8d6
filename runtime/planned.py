"""Realising an execution plan (`effc.compiler.plan.Plan`) on a lowered graph.

The kernel swaps are applied when the graph is built (`to_fx(..., kernels=plan.kernels)`);
micro-batches by the training loop (`accumulate`). This module does the rest:

- `forward_of(gm, plan)`: the callable a train step runs. With activation checkpointing
  the graph is split (torch.fx's split_module) into consecutive pieces along the IR's
  layers -- one piece per layer, or per sublayer where only "attn" or "mlp" is
  recomputed -- and each piece to recompute runs under torch.utils.checkpoint (non-
  reentrant, RNG state preserved, so dropout draws the same masks when recomputed).
  The pieces hold the same Parameter objects as `gm`: the optimizer, checkpoints and
  snapshots keep reading `gm`. With `compile`, the callable goes through torch.compile.
- `precision(plan)`: the autocast context each forward runs in (bf16), or none; backward
  follows the dtypes the forward recorded.
- `problems(plan)`: what this machine cannot do with the plan, said before training.
"""

from __future__ import annotations

import contextlib
import shutil

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from effc.compiler.plan import Plan, graph_pieces


def problems(plan: Plan, device: str = "cpu") -> tuple[list[tuple[str, str]], list[str]]:
    """What the runtime cannot do with the plan on `device` ("cpu" or "cuda"): (errors as
    (message, hint), notes). torch.compile generates C++ on CPU and needs a compiler, and
    does not take FSDP2's hooks; bf16 without the CPU's bf16 matmul instructions runs
    emulated, orders of magnitude slower than fp32."""
    errors, notes = [], []
    cuda = device == "cuda"
    if plan.compile and not cuda and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        errors.append(("--plan compile=true: torch.compile needs a C++ compiler on CPU, and none is on the PATH",
                       "install one (apt-get install g++), or leave compile off"))
    if plan.fsdp is not None and plan.compile:
        what = "offload=true" if plan.offload else f"shard={plan.shard}"
        errors.append((f"--plan {what} with compile=true: FSDP2 under torch.compile is not supported yet",
                       "leave compile off" + ("" if plan.offload else ", or use shard=none (DDP) with compile")))
    if plan.offload and not cuda:
        notes.append("offload=true on the CPU: the tensors are in host memory already, so it saves nothing "
                     "(FSDP2's offload path runs as it would beside a GPU)")
    if plan.precision == "bf16" and not cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        notes.append("this CPU has no bf16 matmul instructions: precision=bf16 runs them emulated, far slower "
                     "than fp32 (bench/train_speed.py measured 0.3 against 188 GFLOP/s on one such machine)")
    return errors, notes


def precision(plan: Plan | None, device: str = "cpu"):
    """The autocast context of a forward on `device` ("cpu" or "cuda") under the plan."""
    if plan is None or plan.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def _recompute(module: torch.nn.Module, *args):
    return checkpoint(module, *args, use_reentrant=False, preserve_rng_state=True)


def _pieces(gm: fx.GraphModule, plan: Plan) -> tuple[dict[fx.Node, int], set[int]]:
    """Each node's piece number (consecutive, in graph order) and the pieces to recompute.
    A node lowered from no IR node (a packing helper before the layers) joins the piece
    around it, `graph_pieces`' "before" or "after"."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    number, key_of, recompute = {}, {}, set()
    for node, (key, again) in zip(nodes, graph_pieces((n.meta.get("ir", "") for n in nodes), plan.checkpoint)):
        number[node] = key_of.setdefault(key, len(key_of))
        if again:
            recompute.add(number[node])
    return number, recompute


def forward_of(gm: fx.GraphModule, plan: Plan | None, own: bool = False):
    """The module a train step calls: gm itself, split for activation checkpointing, and
    compiled, as the plan says. `own` (FSDP2's sharding, effc.runtime.distributed): split
    at every layer even without checkpointing, and move each param that only one piece
    reads into that piece (`owners`), so a `fully_shard` of the piece finds its params."""
    run: torch.nn.Module = gm
    if plan is not None and (own or any(c != "none" for c in plan.checkpoint)):
        number, recompute = _pieces(gm, plan)
        split = split_module(gm, gm, lambda n: number[n], keep_original_order=True)
        for node in split.graph.nodes:
            if node.op == "call_module" and int(node.target.rsplit("_", 1)[1]) in recompute:
                with split.graph.inserting_before(node):
                    new = split.graph.call_function(_recompute, (split.graph.get_attr(node.target), *node.args),
                                                    node.kwargs)
                node.replace_all_uses_with(new)
                split.graph.erase_node(node)
        if own:
            _own_params(split)
        split.graph.lint()
        split.recompile()
        run = split
    if plan is not None and plan.compile:
        run = torch.compile(run)
    return run


def _piece_call(node: fx.Node) -> tuple[str, int] | None:
    """(submodule name, index of its first argument in node.args) when `node` runs a piece
    of the split: directly, or under `_recompute`."""
    if node.op == "call_module":
        return node.target, 0
    if node.op == "call_function" and node.target is _recompute and node.args[0].op == "get_attr":
        return node.args[0].target, 1
    return None


def _own_params(split: fx.GraphModule) -> None:
    """Move each parameter that exactly one piece reads from the split's root (where
    split_module leaves it, passed in as an argument) into that piece, as a get_attr of
    the piece's own. The same Parameter objects: gm still holds them. A param read by
    several pieces (a tied embedding and head, a layer reused by recurrence) stays with
    the root. `split.meta["owners"]` maps each moved param's name in the split
    ("submod_3.layers_0_attn_q_weight") to its name in the root ("layers.0.attn.q.weight")."""
    owners = {}
    readers: dict[str, set[fx.Node]] = {}  # a param's target -> the nodes reading it (one get_attr each, or more)
    for node in split.graph.nodes:
        if node.op == "get_attr":
            readers.setdefault(node.target, set()).update(node.users)
    for node in list(split.graph.nodes):
        call = _piece_call(node)
        if call is None:
            continue
        name, first = call
        sub: fx.GraphModule = split.get_submodule(name)
        holders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        body = next(n for n in sub.graph.nodes if n.op != "placeholder")
        keep_args, drop = [], []
        for holder, arg in zip(holders, node.args[first:]):
            if (isinstance(arg, fx.Node) and arg.op == "get_attr" and readers[arg.target] == {node}
                    and _is_param(split, arg.target)):
                drop.append((holder, arg))
            else:
                keep_args.append(arg)
        if not drop:
            continue
        for holder, arg in drop:
            leaf = arg.target.replace(".", "_")
            sub.register_parameter(leaf, split.get_parameter(arg.target))
            with sub.graph.inserting_before(body):  # after every placeholder
                got = sub.graph.get_attr(leaf)
            holder.replace_all_uses_with(got)
            sub.graph.erase_node(holder)
            owners[f"{name}.{leaf}"] = arg.target
        sub.graph.lint()
        sub.recompile()
        node.args = (*node.args[:first], *keep_args)
        for _, arg in drop:  # the root no longer holds it: fully_shard(root) must not manage it too
            split.graph.erase_node(arg)
            owner, _, leaf = arg.target.rpartition(".")
            delattr(split.get_submodule(owner) if owner else split, leaf)
    split.meta["owners"] = owners


def _is_param(m: torch.nn.Module, target: str) -> bool:
    owner, _, leaf = target.rpartition(".")
    return isinstance(getattr(m.get_submodule(owner) if owner else m, leaf, None), torch.nn.Parameter)
