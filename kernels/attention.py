"""Self-attention core: softmax(q k^T / sqrt(head_dim) + mask) v, per head, with
grouped-query attention (each key/value head serves heads / kv_heads query heads). The
mask is causal for decoders; encoders attend both ways; `keep_BT` (True for a real
token, False for padding) hides padded keys; `segments_BT` (packed sequences: the number
of the record each position belongs to) keeps each position to keys of its own record,
and to keys of segment -1 (a soft prompt's positions, which every record follows).

Legend: q_BTD is (batch, seq, heads * head_dim); k_BTK and v_BTK are (batch, seq,
kv_heads * head_dim). The CPU path is torch's fused scaled_dot_product_attention, which
keeps no seq x seq matrix for backward (only its inputs, output and a logsumexp per row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, n, D // n).transpose(1, 2)  # (B, n, T, hd), a view


def _mask(B: int, T: int, causal: bool, keep_BT, segments_BT, device) -> torch.Tensor:
    """(B, 1, T, T) bool: which keys (last dim) each query may see."""
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if keep_BT is not None:
        allowed = allowed & keep_BT[:, None, None, :]
    if segments_BT is not None:
        same = segments_BT[:, None, :, None] == segments_BT[:, None, None, :]
        allowed = allowed & (same | (segments_BT[:, None, None, :] < 0))
    return allowed


def attention(q_BTD: torch.Tensor, k_BTK: torch.Tensor, v_BTK: torch.Tensor, heads: int, kv_heads: int,
              causal: bool = True, keep_BT: torch.Tensor | None = None,
              segments_BT: torch.Tensor | None = None) -> torch.Tensor:
    B, T, D = q_BTD.shape
    q, k, v = _heads(q_BTD, heads), _heads(k_BTK, kv_heads), _heads(v_BTK, kv_heads)
    if kv_heads != heads:  # repeat each key/value head for its group of query heads
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if keep_BT is None and segments_BT is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(B, T, causal, keep_BT, segments_BT, q.device))
    return o.transpose(1, 2).reshape(B, T, D)  # (B, H, T, hd) -> (B, T, D)


def attention_ref(q_BTD, k_BTK, v_BTK, heads: int, kv_heads: int, causal: bool = True,
                  keep_BT: torch.Tensor | None = None, segments_BT: torch.Tensor | None = None) -> torch.Tensor:
    """The textbook formula with an explicit (T, T) score matrix."""
    B, T, D = q_BTD.shape
    q, k, v = _heads(q_BTD, heads), _heads(k_BTK, kv_heads), _heads(v_BTK, kv_heads)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)  # (B, H, T, T)
    allowed = _mask(B, T, causal, keep_BT, segments_BT, q.device)
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (p @ v).transpose(1, 2).reshape(B, T, D)
