"""`effc profile`: measure this machine for the cost model (effc.compiler.profile).

Each number is the best of several timed repeats after a warm-up (a peak, as a roofline
wants): matmuls over a grid of shapes per dtype (bf16 only where it is not emulated: on a
CPU without bf16 instructions one 2048^3 matmul is timed once and the rate recorded, so a
plan can see how slow it is), a large copy for memory bandwidth, and the per-call cost of
a tiny aten op and of a tiny effc custom op (the Python dispatch a kernel swap adds).
Collectives: two processes on this machine run the three collectives data parallelism
uses on a float32 tensor over gloo (and NCCL where two GPUs exist): an all-reduce (DDP),
an all-gather and a reduce-scatter (FSDP2). The profile keeps each one's bus bandwidth,
the rate the time model's communication term divides by: 2 (w-1)/w x bytes / time for
the all-reduce, (w-1)/w x bytes / time for the others (bytes: the whole tensor, the
all-gather's output and the reduce-scatter's input). Over gloo on a CPU the latter two
run several times slower a byte than the all-reduce.
"""

from __future__ import annotations

import platform
import time

import torch

from effc.compiler.profile import DeviceProfile

SHAPES = [(128, 128, 128), (512, 512, 512), (2048, 512, 512), (2048, 2048, 512), (2048, 2048, 2048)]
QUICK = [(64, 64, 64), (256, 256, 256)]


def _best(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(quick: bool = False, threads: int | None = None) -> DeviceProfile:
    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = QUICK if quick else SHAPES
    repeats = 3 if quick else 10
    matmul: dict[str, list[list[float]]] = {}
    dtypes = [torch.float32, torch.bfloat16]
    emulated = not cuda and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for dtype in dtypes:
        rows = []
        # Emulated bf16 (no bf16 matmul instructions) is slow, and slower still at large
        # shapes: two small shapes, and the largest timed once unless --quick.
        slow = [(128, 128, 128), (512, 512, 512)] + ([] if quick else shapes[-1:])
        for m, n, k in (slow if dtype is torch.bfloat16 and emulated else shapes):
            a = torch.randn(m, k, device=dev, dtype=dtype)
            b = torch.randn(k, n, device=dev, dtype=dtype)
            if dtype is torch.bfloat16 and emulated and m * n * k > 512**3:
                t = _once(lambda: a @ b, sync)  # seconds to minutes: once is enough to say how slow
            else:
                t = _best(lambda: a @ b, repeats, sync)
            rows.append([float(m), float(n), float(k), 2.0 * m * n * k / t])
        matmul[str(dtype).split(".")[1]] = rows
    elements = (1 << 22) if quick else (1 << 26)  # 16 MiB or 256 MiB of float32
    src = torch.randn(elements, device=dev)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), repeats, sync)
    tiny = torch.randn(8, device=dev)
    w = torch.ones(8, device=dev)
    calls = 50 if quick else 500

    def many(f):
        def run():
            for _ in range(calls):
                f()
        return run

    import effc.kernels.rmsnorm  # noqa: F401  (registers effc::rms_norm)

    aten = _best(many(lambda: torch.add(tiny, tiny)), repeats, sync) / calls
    custom = _best(many(lambda: torch.ops.effc.rms_norm(tiny, w, 1e-5)), repeats, sync) / calls
    host = {}
    if cuda:  # what offload moves: pinned host memory to the device and back, and host memory itself
        pinned = torch.empty(elements, pin_memory=True)
        on_device = torch.empty(elements, device=dev)
        host["link"] = 2 * elements * 4 / (_best(lambda: on_device.copy_(pinned), repeats, sync)
                                           + _best(lambda: pinned.copy_(on_device), repeats, sync))
        other = torch.empty(elements)
        host["bandwidth"] = 2 * elements * 4 / _best(lambda: other.copy_(pinned), repeats, lambda: None)
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    return DeviceProfile(name=f"{name}, {torch.get_num_threads()} threads", device=dev,
                         threads=torch.get_num_threads(), matmul=matmul, bandwidth=bandwidth,
                         overhead={"aten_op": aten, "custom_op": custom}, collectives=collectives(quick), host=host,
                         measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), torch=torch.__version__,
                         source="measured")


def _collectives_worker(rank: int, world: int, port: int, backend: str, elements: int, repeats: int,
                        out: str) -> None:
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    whole = torch.ones(elements, device=dev)
    part = torch.ones(elements // world, device=dev)
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    # torch 2.13 renamed the two (the old names warn); older releases have only the old
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    ops = {"all_reduce": lambda: dist.all_reduce(whole),
           "all_gather": lambda: all_gather(whole, part),
           "reduce_scatter": lambda: reduce_scatter(part, whole)}
    times: dict[str, list[float]] = {k: [] for k in ops}
    for i in range(repeats + 2):  # two warm-ups; the ops interleaved
        for name, op in ops.items():
            dist.barrier()
            t0 = time.perf_counter()
            op()
            sync()
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({k: sorted(v)[len(v) // 2] for k, v in times.items()}, f)
    dist.destroy_process_group()


def collectives(quick: bool = False) -> dict:
    """Bus bandwidths of an all-reduce, an all-gather and a reduce-scatter between two
    processes, per backend."""
    import json
    import socket
    import tempfile
    from pathlib import Path

    import torch.multiprocessing as mp

    backends = ["gloo"] + (["nccl"] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [])
    elements = (1 << 20) if quick else (1 << 23)  # 4 MiB or 32 MiB of float32
    out: dict = {}
    for backend in backends:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            result = str(Path(tmp) / "t.json")
            mp.spawn(_collectives_worker, args=(2, port, backend, elements, 3 if quick else 7, result), nprocs=2)
            seconds = json.loads(Path(result).read_text())
        size = 4 * elements
        out[backend] = {"processes": 2, "bytes": size, "bus_bandwidth": size / seconds["all_reduce"],  # 2 (w-1)/w = 1
                        "all_gather": size / 2 / seconds["all_gather"],
                        "reduce_scatter": size / 2 / seconds["reduce_scatter"]}
    return out


def _once(fn, sync) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def summary(p: DeviceProfile) -> str:
    """What a person reads: the profile's source and its numbers."""
    lines = [f"device profile: {p.name} ({p.source})"]
    for dtype, rows in p.matmul.items():
        for m, n, k, rate in rows:
            lines.append(f"  matmul {dtype:9} {int(m)}x{int(k)} @ {int(k)}x{int(n)}: {rate / 1e9:8.1f} GFLOP/s")
    lines.append(f"  memory bandwidth (copy): {p.bandwidth / 1e9:.1f} GB/s")
    for k, v in p.overhead.items():
        lines.append(f"  one {k.replace('_', ' ')} call: {v * 1e6:.1f} us")
    for backend, c in p.collectives.items():
        rates = [("all-reduce", c.get("bus_bandwidth")), ("all-gather", c.get("all_gather")),
                 ("reduce-scatter", c.get("reduce_scatter"))]
        lines.append(f"  over {backend}, {c['processes']} processes: "
                     + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in rates if v))
    if not p.collectives:
        lines.append("  collectives: not measured (the time model assumes 1 GB/s)")
    if p.host:
        lines.append(f"  host <-> device copies (pinned): {p.host['link'] / 1e9:.1f} GB/s; host memory copy: "
                     f"{p.host['bandwidth'] / 1e9:.1f} GB/s")
    return "\n".join(lines)
