"""Runs tests/triton in its own pytest process under TRITON_INTERPRET=1 (Triton reads the
variable when it is first imported, so it cannot be switched on inside this process).
On a CUDA machine tests/triton runs in the main session on the GPU instead."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, tests/triton runs on the GPU in this session")
def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=--import-mode=importlib", "-q", "-x",
                        str(ROOT / "tests" / "triton")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout, r.stdout[-2000:]
