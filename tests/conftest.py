"""Session set-up shared by every test folder."""

import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tests compare with transformers, PEFT and sentence-transformers on local folders only:
# the hub must never be asked (read by huggingface_hub when first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Plans are searched with the device profile: tests use the built-in default, whatever
# `effc profile` stored on the machine running them (a path that holds no file).
os.environ["EFFC_PROFILE"] = str(ROOT / "tests" / ".no-device-profile.json")
# Command output is compared as plain text: a CI that forces colour must not colour it.
os.environ.pop("FORCE_COLOR", None)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: on a 2-core machine shared with other work a second torch thread makes
    each small matmul wait for it (tests/runtime/test_generate.py measured ~20 ms a
    matmul), far more than the work. A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def costed_kernels():
    """Graphs built with only the kernels whose saved tensors the cost model counts
    (effc.compiler.swaps.COSTED), for modules that compare it with a measured step:
    `pytestmark = pytest.mark.usefixtures("costed_kernels")`."""
    from effc.compiler import swaps

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(swaps, "DEFAULT", swaps.COSTED)
        yield


@pytest.fixture(scope="session", autouse=True)
def example_checkpoints():
    """Examples that start from a Hugging Face checkpoint say in their header how to make
    it (`#   effc init-checkpoint examples/checkpoints/NAME ...`); run each such command
    whose folder does not exist yet, as a user would, before any test reads the examples."""
    from typer.testing import CliRunner

    from effc.cli import app

    for path in sorted((ROOT / "examples").glob("*.eff")):
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"#\s+effc (init-checkpoint .*?)(\s+#.*)?$", line)
            if m:
                args = shlex.split(m.group(1))
                if not (ROOT / args[1]).exists():
                    r = CliRunner().invoke(app, [args[0], str(ROOT / args[1]), *args[2:]])
                    assert r.exit_code == 0, r.output
