"""Dropout that keeps a 1-byte mask for backward.

On CPU `torch.nn.Dropout` multiplies by a float mask and saves it (4 bytes an element);
`torch.native_dropout` saves a bool mask (1 byte), which is what the cost model counts.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]

    def extra_repr(self) -> str:
        return f"p={self.p}"
