"""`effc run --device`: where train steps run (runtime/run.py, cli._device).

On CUDA the model trains on the process's GPU: batches are moved to it, checkpoints and
the states kept between stages come back to host memory, and every other stage runs on
the CPU. The GPU tests compare a CUDA run's loss curve with a CPU run of the same file
(never with stored numbers); they skip where torch sees no GPU. Tolerance: 2e-3 relative
a step -- the GPU runs effc's Triton kernels and cuBLAS, which sum in other orders than
the CPU paths, and AdamW carries the differences through 6 steps.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
RTOL = 2e-3

LORA = """pipeline dev

model m = decoder(vocab=32, dim=32, layers=2, heads=2, ffn=64, seq=16)
data d = markov(seq=16, vocab=32, seed=3)

stage pre:
    train m on d (steps=6, batch=4, optimizer=adamw(lr=1e-2))

stage tune:
    adapt m.layers[*].attn.{q,v} with lora(rank=4)
    train m on d (steps=6, batch=4, checkpoint_every=3, eval_every=3, optimizer=adamw(lr=1e-2))
    eval m on d (metrics=[perplexity])
"""


def effc(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "effc", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_command_line_error(tmp_path):
    (tmp_path / "p.eff").write_text(LORA)
    r = effc("run", "p.eff", "-o", "run", "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 1
    assert "<command line>:1:1: error[E0114]: --device cuda: this torch sees no CUDA GPU" in r.stderr
    assert "hint: use --device cpu" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing ran


def test_an_unknown_device_is_a_command_line_error(tmp_path):
    (tmp_path / "p.eff").write_text(LORA)
    r = effc("run", "p.eff", "-o", "run", "--device", "tpu", cwd=tmp_path)
    assert r.returncode == 1 and "error[E0114]: --device tpu: unknown device" in r.stderr


@CUDA
def test_training_on_cuda_follows_the_cpu_curve_and_keeps_state_on_the_host(tmp_path):
    from safetensors.torch import load_file

    (tmp_path / "p.eff").write_text(LORA)
    cpu = effc("run", "p.eff", "-o", "cpu", "--device", "cpu", "--threads", "1", cwd=tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    gpu = effc("run", "p.eff", "-o", "gpu", "--device", "cuda", cwd=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    assert "device: cuda:0" in gpu.stderr
    want, got = records(tmp_path / "cpu", "train"), records(tmp_path / "gpu", "train")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), (g, w)
    # validation during training (on the GPU) and the eval stage after it (on the CPU, from host state)
    want, got = records(tmp_path / "cpu", "eval"), records(tmp_path / "gpu", "eval")
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g["perplexity"] == pytest.approx(w["perplexity"], rel=RTOL), (g, w)
    snap = load_file(tmp_path / "gpu/stages/01_tune/models/m.safetensors")
    assert all(t.device.type == "cpu" for t in snap.values())
    assert set(snap) == set(load_file(tmp_path / "cpu/stages/01_tune/models/m.safetensors"))


@CUDA
def test_a_cuda_checkpoint_resumes_on_the_cpu(tmp_path):
    """Checkpoints hold host tensors: a train stopped on the GPU continues on the CPU."""
    import signal
    import time

    (tmp_path / "p.eff").write_text(LORA.replace("steps=6, batch=4, checkpoint_every=3",
                                                 "steps=400, batch=4, checkpoint_every=3"))
    proc = subprocess.Popen([sys.executable, "-m", "effc", "run", "p.eff", "-o", "run", "--device", "cuda"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((tmp_path / "run").glob("stages/01_tune/train_*/latest")):
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # a stop request: checkpoint and exit 130
    assert proc.wait(timeout=120) == 130, proc.communicate()[1]
    r = effc("run", "p.eff", "-o", "run", "--device", "cpu", "--resume", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert records(tmp_path / "run", "train")[-1]["step"] == 400


@CUDA
def test_offload_on_cuda_follows_the_cpu_curve(tmp_path):
    """--plan offload=true beside a GPU: FSDP2's CPUOffloadPolicy keeps params, gradients
    and AdamW state in pinned host memory, and steps on the CPU."""
    (tmp_path / "p.eff").write_text(LORA)
    cpu = effc("run", "p.eff", "-o", "cpu", "--device", "cpu", "--threads", "1", cwd=tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    gpu = effc("run", "p.eff", "-o", "gpu", "--device", "cuda", "--plan", "offload=true", cwd=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    assert "offload to host" in gpu.stderr and "saves nothing" not in gpu.stderr
    for g, w in zip(records(tmp_path / "gpu", "train"), records(tmp_path / "cpu", "train"), strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), (g, w)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("shard", ["none", "zero3"])
def test_two_gpus_over_nccl_follow_the_cpu_curve(tmp_path, shard):
    """--nproc 2 --device cuda: a GPU a process (its local rank's), gradients over NCCL."""
    (tmp_path / "p.eff").write_text(LORA)
    cpu = effc("run", "p.eff", "-o", "cpu", "--device", "cpu", "--threads", "1", cwd=tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    gpu = effc("run", "p.eff", "-o", "gpu", "--device", "cuda", "--nproc", "2", "--plan", f"shard={shard}",
               cwd=tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    assert "2 processes" in gpu.stderr and "device: cuda:0" in gpu.stderr
    for g, w in zip(records(tmp_path / "gpu", "train"), records(tmp_path / "cpu", "train"), strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=RTOL), (g, w)
