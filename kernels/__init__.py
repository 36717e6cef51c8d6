"""effc.kernels: the ops the fx graph calls (see each module), each a torch reference and
an `effc::` custom op with a CPU path; `triton/` holds their CUDA kernels."""

import torch


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op's arithmetic and reductions run in: float64 for float64, float32
    for float32 and the 16-bit dtypes."""
    return torch.promote_types(dtype, torch.float32)
