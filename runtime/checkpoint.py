"""Crash-safe files and training checkpoints: a run killed at any instant (SIGKILL in the
middle of a save included) loses nothing that was committed. Only safetensors and JSON are
written or read, never pickle, so loading a file can never run code.

Single files (`atomic_write_*`, `write_tensors`) go to `.tmp-NAME-RANDOM` in the target's
folder, are flushed and fsynced, `os.replace`d onto NAME, and the folder is fsynced: a
reader sees the old file or the new one, never a mix.

Checkpoints, for one writer per ROOT:

    ROOT/step_00000123/tensors.safetensors   the tensors
    ROOT/step_00000123/meta.json             meta with "step": 123, "format": 1,
                                             "tensors_bytes" and "tensors_sha256" set
    ROOT/latest                              "step_00000123\\n": the committed checkpoint

save_checkpoint(ROOT, 123, ...):
 1. write both files into a fresh ROOT/.tmp-step_00000123-RANDOM/, fsync each file, then the folder;
 2. if ROOT/step_00000123 exists (an attempt that was interrupted before step 4, or one that
    fails verification), rename it aside to ROOT/.tmp-old-step_00000123-RANDOM; a valid
    step_00000123 that `latest` names is refused: rename cannot replace it crash-safely;
 3. os.rename the temporary folder to ROOT/step_00000123 and fsync ROOT;
 4. commit: atomic_write_text(ROOT/latest, "step_00000123\\n");
 5. prune: keep the newest `keep` step folders up to 123 (so `latest`'s is always kept),
    delete the older ones and any above 123 (left by an abandoned attempt), and every
    ROOT/.tmp-* entry; each folder is renamed to .tmp-del-* before it is deleted, so a kill
    never leaves half a step folder.

load_latest(ROOT) verifies the folder `latest` names: meta.json parses, its step and format
match, and tensors.safetensors has the recorded size and SHA-256. When `latest` is missing
(a kill between steps 3 and 4) or its checkpoint fails verification, it falls back to the
newest step folder that verifies; .tmp-* entries are never read. None means no checkpoint
was ever completed; a CheckpointError means some exist and none verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

FORMAT = 1
TENSORS, META, LATEST, TMP = "tensors.safetensors", "meta.json", "latest", ".tmp-"
_STEP = re.compile(r"step_(\d{8,})")


class CheckpointError(Exception):
    """A missing, corrupt or unusable file; message and hint are shown to the user as is."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict  # meta.json as stored: the caller's meta with the keys save_checkpoint sets


# ---------------------------------------------------------------- single files


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (created, renamed, replaced files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{TMP}{path.name}-{secrets.token_hex(4)}")
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    # safetensors refuses tensors that share storage and needs them dense: each gets its own
    # contiguous CPU copy (a same-dtype copy moves bytes, so NaN payloads and -0.0 survive)
    own = {k: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, t in tensors.items()}
    return safetensors.torch.save(own, metadata)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, _serialize(tensors, metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = safetensors.torch.load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read tensors from {path}: {e}",
                              "the file is missing, truncated, or not a safetensors file: "
                              "write it again, or restore it from a copy") from e
    # load_file maps the file into memory: copy out so the tensors outlive the file
    return {k: t.clone() for k, t in loaded.items()}


# ---------------------------------------------------------------- checkpoints


def _name(step: int) -> str:
    return f"step_{step:08d}"


def _step_folders(root: Path) -> dict[int, Path]:
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and _name(int(m[1])) == p.name and p.is_dir():
            found[int(m[1])] = p
    return found


def list_checkpoints(root: Path) -> list[int]:
    """Steps whose folder exists: the rename that creates it happens only once both files
    are complete and fsynced. Contents are verified by load_latest, not here."""
    return sorted(_step_folders(root))


def _verify(folder: Path, step: int) -> Checkpoint | str:
    """The checkpoint in `folder`, or what is wrong with it."""
    try:
        meta = json.loads((folder / META).read_bytes())
    except (OSError, ValueError) as e:
        return f"{folder / META} is unreadable or not JSON ({e})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("step") != step:
        return f"{folder / META} does not describe step {step} in format {FORMAT}"
    try:
        with open(folder / TENSORS, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        return f"{folder / TENSORS} is unreadable ({e})"
    if size != meta.get("tensors_bytes"):
        return f"{folder / TENSORS} is truncated or corrupt: {size} bytes, {META} records {meta.get('tensors_bytes')}"
    if digest != meta.get("tensors_sha256"):
        return f"{folder / TENSORS} is corrupt: its SHA-256 differs from the one {META} records"
    try:
        return Checkpoint(step, folder, read_tensors(folder / TENSORS), meta)
    except CheckpointError as e:
        return e.message


def _pointer(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None


def load_latest(root: Path) -> Checkpoint | None:
    folders = _step_folders(root)
    pointer = _pointer(root)
    if pointer is None and not folders:
        return None
    problems = []
    order = sorted(folders, reverse=True)
    if pointer is not None:
        m = _STEP.fullmatch(pointer)
        if m is None or int(m[1]) not in folders or _name(int(m[1])) != pointer:
            problems.append(f"{root / LATEST} names {pointer!r}, which is not a checkpoint folder in {root}")
        else:
            order.remove(int(m[1]))
            order.insert(0, int(m[1]))
    for step in order:
        got = _verify(folders[step], step)
        if isinstance(got, Checkpoint):
            return got
        problems.append(got)
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(problems),
                          f"delete {root} to start over")


def _delete(path: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves only a .tmp-* folder."""
    aside = path.with_name(f"{TMP}del-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, aside)
    shutil.rmtree(aside)


def save_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2) -> Path:
    """Write and commit the checkpoint of `step` (protocol in the module docstring); returns its folder."""
    if step < 0 or keep < 1:
        raise ValueError(f"need step >= 0 and keep >= 1, got step={step}, keep={keep}")
    name = _name(step)
    target = root / name
    if target.exists() and _pointer(root) == name and isinstance(_verify(target, step), Checkpoint):
        raise CheckpointError(f"step {step} is already the committed checkpoint in {root}",
                              f"checkpoints are written once: save a later step, or delete {root} to start over")
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)
    tmp = root / f"{TMP}{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        data = _serialize(tensors, None)
        _write_synced(tmp / TENSORS, data)
        full = {**meta, "step": step, "format": FORMAT,
                "tensors_bytes": len(data), "tensors_sha256": hashlib.sha256(data).hexdigest()}
        _write_synced(tmp / META, (json.dumps(full, indent=1) + "\n").encode("utf-8"))
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.rename(target, root / f"{TMP}old-{name}-{secrets.token_hex(4)}")
    os.rename(tmp, target)
    fsync_dir(root)
    atomic_write_text(root / LATEST, name + "\n")
    # Pruning needs no fsync: if a crash undoes it, the next save prunes again.
    steps = sorted(_step_folders(root))
    kept = [s for s in steps if s <= step][-keep:]
    for s in steps:
        if s not in kept:
            _delete(root / _name(s))
    for p in root.iterdir():
        if p.name.startswith(TMP) and p.is_dir():
            shutil.rmtree(p)
        elif p.name.startswith(TMP):
            p.unlink()
    return target
