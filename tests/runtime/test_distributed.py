"""effc run --nproc N: data-parallel training through torchrun (runtime/distributed.py).

Every curve is compared with a 1-process run of the same file (the same global batch),
never with stored numbers. Tolerance: a relative 1e-5 on each step's loss. The processes
compute the same sums in another order -- each rank's share of the batch goes through its
own matmuls, and the gradients are added across ranks by an all-reduce instead of inside
one backward (and FSDP2 sums the gradient norm for clipping shard by shard) -- so the
curves agree to float32 rounding, about 1e-7 relative a step, which AdamW carries into
later steps without growing much over the few steps run here.

Tiny models (dim 16, 2 layers, seq 8), one thread a process: the 2-core machine runs two
workers at once.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effc.runtime.distributed import Launch, launch_problems, torchrun_argv

RTOL = 1e-5

LORA = """pipeline dp

model m = decoder(vocab=16, dim=16, layers=2, heads=2, ffn=32, seq=8)
data d = markov(seq=8, vocab=16, seed=3)

stage tune:
    adapt m.layers[*].attn.{q,v} with lora(rank=2)
    train m on d (steps=8, batch=5, clip=1.0, optimizer=adamw(lr=1e-2))
"""

# full-parameter training, long enough to be killed after its first checkpoint
FULL = """pipeline full

model m = decoder(vocab=16, dim=16, layers=2, heads=2, ffn=32, seq=8)
data d = markov(seq=8, vocab=16, seed=3)

stage pre:
    train m on d (steps=60, batch=4, clip=1.0, checkpoint_every=5, optimizer=adamw(lr=1e-2))
"""


def effc(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=180)


def start(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "effc", *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def curve(run: Path) -> dict:
    """step -> loss, the later line winning (a resumed run repeats steps after its checkpoint)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


def assert_same_curve(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=RTOL), f"step {s}: {got[s]} against {want[s]}"


def folder(tmp_path: Path, text: str) -> Path:
    (tmp_path / "p.eff").write_text(text)
    return tmp_path


def one_process_curve(d: Path, text: str) -> dict:
    """The loss curve of `text` run by one process, in folder d."""
    r = effc("run", "p.eff", "-o", "run", "--threads", "1", cwd=folder(d, text))
    assert r.returncode == 0, r.stderr
    return curve(d / "run")


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory) -> dict:
    return one_process_curve(tmp_path_factory.mktemp("lora1"), LORA)


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory) -> dict:
    return one_process_curve(tmp_path_factory.mktemp("full1"), FULL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers a launcher started (its children with RANK set)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            status = Path(f"/proc/{d}/status").read_text()
            if f"\nPPid:\t{launcher}\n" not in status:
                continue
            env = Path(f"/proc/{d}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        out.update({int(e[5:]): int(d) for e in env if e.startswith(b"RANK=")})
    return out


def kill_after_checkpoint(proc: subprocess.Popen, run: Path, rank: int | None) -> None:
    """SIGKILL worker `rank` (None: the process itself) once the first checkpoint is committed."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list(run.glob("stages/*/train_*/latest")):
            pid = proc.pid if rank is None else workers(proc.pid)[rank]
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)
    pytest.fail(f"the run ended before it could be killed: {proc.communicate()[1]}")


# ---------------------------------------------------------------- launch options


def test_launch_options_are_checked_and_turned_into_torchrun_arguments(tmp_path):
    assert not Launch().distributed and Launch(nproc=2).distributed and Launch(nnodes=2).distributed
    assert launch_problems(Launch(nproc=2)) == []
    assert [m for m, _ in launch_problems(Launch(nproc=0))] == ["--nproc 0: needs at least one process"]
    assert "not HOST:PORT" in launch_problems(Launch(nnodes=2, node_rank=0, endpoint="host"))[0][0]
    assert "rendezvous" in launch_problems(Launch(nnodes=2))[0][0]
    assert "not a node" in launch_problems(Launch(nnodes=2, node_rank=2, endpoint="h:1"))[0][0]

    one = torchrun_argv(Launch(nproc=2), ["p.eff", "--out=run"])
    assert "--standalone" in one and "--nproc-per-node=2" in one and "--max-restarts=0" in one
    assert one[-5:] == ["-m", "effc", "run", "p.eff", "--out=run"]
    two = torchrun_argv(Launch(nproc=1, nnodes=2, node_rank=1, endpoint="10.0.0.1:29500"), ["p.eff"])
    assert {"--nnodes=2", "--rdzv-backend=static", "--node-rank=1", "--rdzv-endpoint=10.0.0.1:29500"} <= set(two)
    assert "--standalone" not in two

    # bad values are diagnostics, and nothing is launched
    d = folder(tmp_path, LORA)
    r = effc("run", "p.eff", "--nproc", "0", "--nnodes", "2", "--rdzv-endpoint", "nowhere", cwd=d)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error[E0114]: --nproc 0" in r.stderr and "error[E0114]: --rdzv-endpoint nowhere: not HOST:PORT" in r.stderr
    assert not (d / "runs").exists()


# ---------------------------------------------------------------- curves


@pytest.mark.parametrize("shard", ["none", "zero3", "zero2"])
def test_two_processes_give_the_one_process_curve(tmp_path, lora_reference, shard):
    """DDP and FSDP2: batch 5 shared 3 + 2, LoRA, clipping on; the same curve to rounding."""
    d = folder(tmp_path, LORA)
    r = effc("run", "p.eff", "-o", "run", "--threads", "1", "--nproc", "2", "--plan", f"shard={shard}", cwd=d)
    assert r.returncode == 0, r.stderr
    assert ("DDP" if shard == "none" else f"FSDP2 {shard}") in r.stderr and "2 processes" in r.stderr
    assert r.stderr.count("step 8/8") == 1  # rank 0 alone reports
    assert_same_curve(curve(d / "run"), lora_reference)
    # the stage's snapshot holds full tensors, like a 1-process run's
    from safetensors.torch import load_file

    snap = load_file(d / "run/stages/00_tune/models/m.safetensors")
    assert tuple(snap["layers[0].attn.q.lora0.A"].shape) == (2, 16)


# full training of a model whose weights outweigh its activations, so sharding shows
WEIGHTY = """pipeline weighty

model m = decoder(vocab=512, dim=64, layers=3, heads=4, ffn=176, seq=16)
data d = markov(seq=16, vocab=512, seed=3)

stage pre:
    train m on d (steps=3, batch=4, optimizer=adamw(lr=1e-3))
"""


def test_fsdp2_shards_a_layer_at_a_time_as_the_cost_model_predicts(tmp_path):
    """FSDP2 shards one group a layer (runtime/planned.forward_of(own=True)): zero3 frees
    each layer's gathered weights after its forward, so a process's tensor-level peak is
    below zero2's, and both are within the planner's 10% of the cost model's prediction
    (compiler/cost.MemoryModel.sharded), each measured on the run's second step."""
    peaks = {}
    for shard in ("zero2", "zero3"):
        (tmp_path / shard).mkdir()
        d = folder(tmp_path / shard, WEIGHTY)
        r = effc("run", "p.eff", "-o", "run", "--threads", "1", "--nproc", "2", "--plan", f"shard={shard}", cwd=d)
        assert r.returncode == 0, r.stderr
        (rec,) = [json.loads(line) for line in (d / "run/metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "prediction"]
        assert rec["peak_measure"] == "tensor-level, step 2"
        assert 0.90 <= rec["predicted_peak"] / rec["measured_peak"] <= 1.10, (shard, rec)
        peaks[shard] = rec["measured_peak"]
    # 0.84 MiB of weights (and as much again of gradients): zero3 holds one 0.2 MiB layer
    # gathered at a time, zero2 every layer from its forward to its backward
    assert peaks["zero3"] < 0.9 * peaks["zero2"], peaks


# layers looped as shared blocks: params several pieces read stay with FSDP2's root group
RECURSIVE = """pipeline recur

model m = decoder(vocab=32, dim=16, layers=4, heads=2, ffn=32, seq=8)
data d = markov(seq=8, vocab=32, seed=3)

stage recurse:
    share m.layers[0:4] as recursive(blocks=2, init=average)
    train m on d (steps=4, batch=4, optimizer=adamw(lr=1e-2))
"""


def test_zero3_with_layers_shared_across_pieces_gives_the_one_process_curve(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    want = one_process_curve(tmp_path / "one", RECURSIVE)
    two = folder(tmp_path / "two", RECURSIVE)
    r2 = effc("run", "p.eff", "-o", "run", "--threads", "1", "--nproc", "2", "--plan", "shard=zero3", cwd=two)
    assert r2.returncode == 0, r2.stderr
    assert "FSDP2 zero3" in r2.stderr
    assert_same_curve(curve(two / "run"), want)


@pytest.mark.parametrize("nproc", [1, 2])
def test_offload_gives_the_one_process_curve(tmp_path, lora_reference, nproc):
    """--plan offload=true: FSDP2 with CPUOffloadPolicy (a 1-process group for one
    process). On a CPU it moves nothing, but it runs the same path as beside a GPU."""
    d = folder(tmp_path, LORA)
    r = effc("run", "p.eff", "-o", "run", "--threads", "1", "--nproc", nproc, "--plan", "offload=true", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "offload to host" in r.stderr and "saves nothing" in r.stderr
    assert ("2 processes, FSDP2" in r.stderr) == (nproc == 2)  # zero2 or zero3, as the search chose
    assert_same_curve(curve(d / "run"), lora_reference)


def test_a_two_node_rendezvous_on_localhost(tmp_path, lora_reference):
    d = folder(tmp_path, LORA)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start("run", "p.eff", "-o", "run", "--threads", "1", "--nproc", "1", "--nnodes", "2",
                   "--node-rank", str(i), "--rdzv-endpoint", endpoint, cwd=d) for i in (0, 1)]
    results = [(p.wait(timeout=180), *p.communicate()) for p in nodes]
    for status, _, err in results:
        assert status == 0, err
    assert "2 processes, DDP" in results[0][2]
    assert_same_curve(curve(d / "run"), lora_reference)


def test_budget_devices_launches_that_many_processes_and_plans_for_them(tmp_path, lora_reference):
    """budget(devices=2): `effc run` without --nproc launches two, and `effc plan` plans
    for two (the shard field is searched, a process's micro-batch is at most 3 of 5)."""
    d = folder(tmp_path, LORA.replace("pipeline dp\n", "pipeline dp\nbudget(memory=1GiB, devices=2)\n"))
    plan = effc("plan", "p.eff", "--format", "json", "--top", "50", cwd=d)
    assert plan.returncode == 0, plan.stderr
    ranked = json.loads(plan.stdout)["steps"][0]["ranked"]
    assert {r["plan"]["world"] for r in ranked} == {2} and {r["plan"]["shard"] for r in ranked} >= {"none", "zero2"}
    assert max(r["plan"]["micro_batch"] for r in ranked) == 3
    r = effc("run", "p.eff", "-o", "run", "--threads", "1", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "2 processes" in r.stderr
    assert_same_curve(curve(d / "run"), lora_reference)


# ---------------------------------------------------------------- failures and resuming


def test_a_killed_worker_ends_the_run_with_a_resumable_checkpoint(tmp_path, full_reference):
    """FSDP2 zero3, full-parameter training: SIGKILL worker 1 after the first checkpoint;
    the launcher says what died and how to resume, and 1 process resumes the 2-process
    checkpoint (full params and AdamW state) onto the 1-process curve."""
    d = folder(tmp_path, FULL)
    proc = start("run", "p.eff", "-o", "run", "--threads", "1", "--nproc", "2", "--plan", "shard=zero3", cwd=d)
    t0 = time.time()
    kill_after_checkpoint(proc, d / "run", rank=1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.time() - t0 < 60
    assert "Traceback" not in err
    assert "error[E0505]: worker 1 of 2" in err and "was killed by SIGKILL" in err
    assert "the last checkpoint is step " in err and "train_0" in err
    assert "resume with: effc run p.eff --out=run --threads=1 --plan=shard=zero3 --resume --nproc=2" in err
    step = int(err.split("the last checkpoint is step ")[1].split(",")[0])
    assert step % 5 == 0 and 0 < step < 60

    r = effc("run", "p.eff", "-o", "run", "--threads", "1", "--resume", cwd=d)
    assert r.returncode == 0, r.stderr
    assert f"resuming after step {step}" in r.stderr
    assert "written by 2 processes, this run has 1" in r.stderr
    assert_same_curve(curve(d / "run"), full_reference)


def test_a_one_process_checkpoint_resumes_on_two_fsdp_processes(tmp_path, full_reference):
    """The other way: a 1-process run killed after a checkpoint, resumed by 2 FSDP2 zero3
    processes (each cutting its shard of the full params and AdamW state out of it)."""
    d = folder(tmp_path, FULL)
    proc = start("run", "p.eff", "-o", "run", "--threads", "1", cwd=d)
    kill_after_checkpoint(proc, d / "run", rank=None)
    proc.wait(timeout=60)
    r = effc("run", "p.eff", "-o", "run", "--threads", "1", "--resume", "--nproc", "2", "--plan", "shard=zero3", cwd=d)
    assert r.returncode == 0, r.stderr
    assert "written by 1 process, this run has 2" in r.stderr
    assert_same_curve(curve(d / "run"), full_reference)
