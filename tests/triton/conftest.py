"""Triton kernels, checked by calling their launchers directly against the torch
references, outputs and gradients.

Triton reads TRITON_INTERPRET when it is imported, so without a GPU these tests run in
their own pytest process with TRITON_INTERPRET=1 (tests/kernels/test_triton.py starts it);
in any other process without CUDA the folder is skipped. On a CUDA machine they run on the
GPU, and the bf16 and large-shape tests (which the interpreter cannot run: its bf16 tl.dot
is wrong, and it is slow) run too.

CLOSE is the one tolerance table: (rtol, atol) by dtype for a Triton kernel against the
torch reference computed in float32 from the same inputs.
"""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

CLOSE = {
    torch.float32: (1e-5, 1e-5),  # reductions in a different order; tl.dot in fp32 (tf32 off)
    torch.float16: (2e-3, 2e-3),  # one rounding of the output to fp16, inputs exact
    torch.bfloat16: (1.6e-2, 1.6e-2),  # one rounding to bf16 (8 bits of mantissa)
}


def pytest_collection_modifyitems(config, items):
    if HAVE_TRITON and (INTERPRET or CUDA):
        return
    why = "Triton kernels run on CUDA, or on CPU in their own process under TRITON_INTERPRET=1 " \
          "(tests/kernels/test_triton.py)" if HAVE_TRITON else "triton is not installed"
    for item in items:
        if "tests/triton/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def device():
    return "cuda" if CUDA else "cpu"


@pytest.fixture
def close():
    def check(actual, expected, dtype, scale=1.0):
        """actual (kernel, in dtype) against expected (float32 reference); scale widens
        the atol for values whose magnitude grows with the reduction length."""
        rtol, atol = CLOSE[dtype]
        torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale)
    return check

