"""Crash-safe files and checkpoints: bitwise round trips, the on-disk protocol, every kind of
corruption, files that are not safetensors, and a writer SIGKILLed at random moments."""

import collections
import hashlib
import importlib.util
import json
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import safetensors
import torch

from effc.runtime import checkpoint as C


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes: NaN payloads and -0.0 count, which == would not see."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def special_tensors() -> dict[str, torch.Tensor]:
    quiet_nan_with_payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    f32 = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-45, 1.5, -3e38])
    return {
        "f32": torch.cat([f32, quiet_nan_with_payload, -quiet_nan_with_payload]),
        "i64": torch.tensor([torch.iinfo(torch.int64).min, -1, 0, torch.iinfo(torch.int64).max]),
        "u8": torch.arange(256, dtype=torch.uint8).reshape(16, 16),
        "bool": torch.tensor([[True, False, True], [False, False, True]]),
        "bf16": torch.tensor([float("nan"), float("inf"), -0.0, 1e-40, 3.0e38, 0.1], dtype=torch.bfloat16),
        "scalar": torch.tensor(7.25, dtype=torch.float64),
        "empty": torch.empty(0, 5, dtype=torch.int32),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert same_bits(got[k], want[k]), k


def save(root: Path, step: int, keep: int = 2) -> Path:
    return C.save_checkpoint(root, step, {"w": torch.full((4, 4), float(step)), "n": torch.arange(3) * step},
                             {"step": step, "lr": 0.5}, keep)


def entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def problem(root: Path) -> str:
    with pytest.raises(C.CheckpointError) as e:
        C.load_latest(root)
    assert e.value.hint == f"delete {root} to start over"
    return e.value.message


# ---------------------------------------------------------------- single files


def test_write_read_tensors_is_bitwise_exact(tmp_path):
    want = special_tensors()
    C.write_tensors(tmp_path / "t.safetensors", want, {"note": "kept"})
    assert_same(C.read_tensors(tmp_path / "t.safetensors"), want)
    with safetensors.safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert f.metadata() == {"note": "kept"}
    assert entries(tmp_path) == {"t.safetensors"}


def test_aliased_and_non_contiguous_tensors_are_saved_as_their_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    want = {"base": base, "transposed": base.t(), "strided": base[:, 1::2], "row": base[1],
            "broadcast": torch.tensor([1.0, 2.0]).expand(3, 2), "grad": base.clone().requires_grad_()}
    C.write_tensors(tmp_path / "t.safetensors", want)
    got = C.read_tensors(tmp_path / "t.safetensors")
    assert_same(got, {k: v.detach() for k, v in want.items()})
    assert all(v.is_contiguous() for v in got.values())
    assert torch.equal(base, torch.arange(24, dtype=torch.float32).reshape(4, 6))  # inputs untouched


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc/self/maps")
def test_read_tensors_outlive_their_file_and_own_their_memory(tmp_path):
    C.write_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(1000), "b": torch.ones(1000)})
    got = C.read_tensors(tmp_path / "t.safetensors")
    # a tensor still in the file's mapping would die of SIGBUS if the file were truncated in place
    assert str(tmp_path / "t.safetensors") not in Path("/proc/self/maps").read_text()
    (tmp_path / "t.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor wraps read-only memory
        got["a"] += 2
    assert torch.equal(got["a"], torch.full((1000,), 2.0)) and torch.equal(got["b"], torch.ones(1000))


def test_atomic_writes_replace_whole_files_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "run.json"
    C.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n "b": 1,\n "a": [\n  1,\n  2\n ]\n}\n'
    C.atomic_write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    with pytest.raises(TypeError):
        C.atomic_write_bytes(path, "not bytes")  # fails after the temporary file was created
    assert path.read_bytes() == "héllo\n".encode() and entries(tmp_path) == {"run.json"}


@pytest.mark.parametrize("content", [
    b"",
    b"short",
    random.Random(1).randbytes(4096),
    b"\xff" * 8 + b"{}",
    b"\x02\x00\x00\x00\x00\x00\x00\x00{}x",  # a valid empty header, then a dangling byte
], ids=["empty", "short", "random", "huge-header", "trailing-bytes"])
def test_read_tensors_refuses_files_that_are_not_safetensors(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(C.CheckpointError) as e:
        C.read_tensors(path)
    assert str(path) in e.value.message and "safetensors" in e.value.hint


class _Trap:
    """Unpickling this creates the file it names: proof that a loader ran pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_read_tensors_never_unpickles(tmp_path):
    trap = tmp_path / "unpickled"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": _Trap(str(trap))}))
    with pytest.raises(C.CheckpointError):
        C.read_tensors(path)
    with pytest.raises(C.CheckpointError):
        C.read_tensors(tmp_path / "missing.safetensors")
    assert not trap.exists()


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_layout_and_meta(tmp_path):
    root = tmp_path / "ckpt"
    assert C.load_latest(root) is None and C.list_checkpoints(root) == []
    want = special_tensors()
    meta = {"lr": 1e-3, "name": "run", "nested": {"a": [1, 2]}}
    folder = C.save_checkpoint(root, 123, want, meta)
    assert folder == root / "step_00000123"
    assert entries(root) == {"step_00000123", "latest"} and (root / "latest").read_text() == "step_00000123\n"
    assert entries(folder) == {"tensors.safetensors", "meta.json"}
    data = (folder / "tensors.safetensors").read_bytes()
    stored = {**meta, "step": 123, "format": 1, "tensors_bytes": len(data),
              "tensors_sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((folder / "meta.json").read_text()) == stored
    ck = C.load_latest(root)
    assert (ck.step, ck.path, ck.meta) == (123, folder, stored)
    assert_same(ck.tensors, want)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_prunes_older_checkpoints_and_latest_follows(tmp_path, keep):
    for step in range(1, 6):
        save(tmp_path, step, keep)
        assert (tmp_path / "latest").read_text() == f"step_{step:08d}\n"
    assert C.list_checkpoints(tmp_path) == list(range(6 - keep, 6))
    assert entries(tmp_path) == {"latest"} | {f"step_{s:08d}" for s in range(6 - keep, 6)}
    assert C.load_latest(tmp_path).step == 5


def corrupt_truncate(folder: Path) -> None:
    path = folder / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:-10])


def corrupt_flip(folder: Path) -> None:
    path = folder / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor bytes: safetensors itself cannot tell
    path.write_bytes(bytes(data))


def corrupt_meta(folder: Path) -> None:
    (folder / "meta.json").write_text('{"step": 2, "form')


def corrupt_step(folder: Path) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "step": 7}))


@pytest.mark.parametrize("corrupt, says", [
    (corrupt_truncate, "truncated or corrupt: "),
    (corrupt_flip, "SHA-256 differs"),
    (corrupt_meta, "not JSON"),
    (corrupt_step, "does not describe step 2"),
], ids=["truncated", "flipped-byte", "garbage-meta", "wrong-step"])
def test_a_corrupt_latest_falls_back_then_fails_clearly(tmp_path, corrupt, says):
    save(tmp_path, 1)
    save(tmp_path, 2)
    corrupt(tmp_path / "step_00000002")
    ck = C.load_latest(tmp_path)
    assert ck.step == 1 and torch.equal(ck.tensors["w"], torch.full((4, 4), 1.0))
    corrupt_truncate(tmp_path / "step_00000001")
    message = problem(tmp_path)
    assert f"step_00000002/{'meta.json' if corrupt in (corrupt_meta, corrupt_step) else 'tensors.safetensors'}" in message
    assert says in message and "step_00000001/tensors.safetensors is truncated" in message


def test_latest_naming_a_missing_folder_falls_back(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "latest").write_text("step_00000009\n")
    assert C.load_latest(tmp_path).step == 2
    (tmp_path / "latest").write_text("garbage\x00")
    assert C.load_latest(tmp_path).step == 2
    for step in (1, 2):
        C._delete(tmp_path / f"step_{step:08d}")
    assert "names 'garbage\\x00', which is not a checkpoint folder" in problem(tmp_path)


def test_without_latest_the_newest_step_folder_wins(tmp_path):
    """A kill between the rename and the pointer swap leaves a complete folder and no pointer."""
    save(tmp_path, 1)
    (tmp_path / "latest").unlink()
    assert C.load_latest(tmp_path).step == 1
    save(tmp_path, 2)
    save(tmp_path, 3)
    (tmp_path / "latest").unlink()
    assert C.load_latest(tmp_path).step == 3


def test_temporary_folders_are_ignored_then_cleaned(tmp_path):
    root = tmp_path / "ckpt"
    save(root, 1)
    save(root, 2)
    save(tmp_path / "elsewhere", 3)
    # a complete step 3 that was never renamed into place, and a pointer swap cut short
    (tmp_path / "elsewhere" / "step_00000003").rename(root / ".tmp-step_00000003-0badf00d")
    (root / ".tmp-latest-0badf00d").write_text("step_00000003\n")
    (root / "latest").unlink()
    assert C.load_latest(root).step == 2 and C.list_checkpoints(root) == [1, 2]
    save(root, 3)
    assert entries(root) == {"latest", "step_00000002", "step_00000003"}


def test_an_uncommitted_step_folder_is_replaced(tmp_path):
    """A kill after the rename but before the pointer swap: `latest` still names step 1."""
    save(tmp_path, 1)
    C.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {})
    (tmp_path / "latest").write_text("step_00000001\n")
    assert C.load_latest(tmp_path).step == 1
    save(tmp_path, 2)
    ck = C.load_latest(tmp_path)
    assert ck.step == 2 and torch.equal(ck.tensors["w"], torch.full((4, 4), 2.0))


def test_an_abandoned_newer_step_is_pruned(tmp_path):
    """Resuming from step 1 abandons a step 5 written before: a later fallback must not reach it."""
    save(tmp_path, 1)
    save(tmp_path, 5)
    (tmp_path / "latest").write_text("step_00000001\n")
    save(tmp_path, 2)
    assert C.list_checkpoints(tmp_path) == [1, 2]


def test_a_committed_step_is_written_once(tmp_path):
    save(tmp_path, 1)
    with pytest.raises(C.CheckpointError) as e:
        save(tmp_path, 1)
    assert "already the committed checkpoint" in e.value.message and str(tmp_path) in e.value.hint
    corrupt_flip(tmp_path / "step_00000001")
    save(tmp_path, 1)  # a corrupt one has nothing to lose
    assert C.load_latest(tmp_path).step == 1


# ---------------------------------------------------------------- SIGKILL at random moments

# A fork server: it imports torch once, then forks one writer per line on stdin, so twenty
# restarts cost milliseconds instead of twenty torch imports. Each writer resumes from
# load_latest like a restarted run and saves steps until it is killed.
WRITER = '''
import os, sys, traceback
from pathlib import Path

import torch

from effc.runtime.checkpoint import load_latest, save_checkpoint


def expected(step):
    """About 6 MB a checkpoint, so a kill often lands in the middle of writing one."""
    full = torch.full((1024, 1024), float(step))
    return {"full": full, "row": full[step % 1024], "ramp": torch.arange(1 << 18) * step}


if __name__ == "__main__":
    root = Path(sys.argv[1])
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                ck = load_latest(root)
                step = (ck.step if ck else 0) + 1
                print("started", os.getpid(), flush=True)
                while True:
                    save_checkpoint(root, step, expected(step), {"writer": os.getpid()})
                    step += 1
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        print("reaped", pid, os.waitpid(pid, 0)[1], flush=True)
'''


def read_line(pipe) -> list[str]:
    ready, _, _ = select.select([pipe], [], [], 60)
    assert ready, "the writer server stopped answering"
    return pipe.readline().decode().split()


def test_sigkill_at_random_moments_never_loses_a_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    spec = importlib.util.spec_from_file_location("writer", script)
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    root = tmp_path / "ckpt"
    rng = random.Random(0)
    server = subprocess.Popen([sys.executable, str(script), str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0)
    last, mid_write, leftovers, seen = 0, 0, collections.Counter(), set()
    try:
        for _ in range(20):
            server.stdin.write(b"go\n")
            word, pid = read_line(server.stdout)
            assert word == "started"
            time.sleep(rng.uniform(0, 0.15))
            os.kill(int(pid), signal.SIGKILL)
            word, reaped, status = read_line(server.stdout)
            assert (word, reaped) == ("reaped", pid)
            assert os.WIFSIGNALED(int(status)) and os.WTERMSIG(int(status)) == signal.SIGKILL, "the writer failed"
            tmps = {p.name for p in root.iterdir() if p.name.startswith(".tmp-")} - seen  # this kill's
            seen |= tmps
            mid_write += any(n.startswith(".tmp-step_") for n in tmps)
            leftovers.update(n.split("-")[1].split("_")[0] for n in tmps)
            ck = C.load_latest(root)
            step = ck.step if ck else 0
            assert step >= last, f"went back from step {last} to {step}"
            if ck:
                want = writer.expected(step)
                assert_same(ck.tensors, want)
            last = step
    finally:
        server.kill()
        server.wait()
    print(f"\n20 kills: reached step {last}; {mid_write} landed while a .tmp-step_ folder existed; "
          f"leftover .tmp- kinds {dict(leftovers)}")
    assert last > 0 and mid_write > 0  # it made progress, and kills did land mid-save
