"""Triton kernels: the CUDA paths of the `effc::` custom ops.

Each module here holds `@triton.jit` kernels and plain-Python launchers that take and
return torch tensors (fresh outputs, never views of the inputs). The custom ops in
`effc.kernels.*` call a launcher from their CUDA kernel only; on any other device they
run their torch path. The launchers also run on CPU tensors under `TRITON_INTERPRET=1`
(read when triton is imported), which is how tests/triton checks them without a GPU.

`supports(...)` in each module says which inputs a launcher takes (dtypes, contiguity,
sizes); the op falls back to its torch path for the rest (float64, for one).
"""

from __future__ import annotations

import os


def available() -> bool:
    """Triton importable, and either a CUDA device or the interpreter to run on."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
