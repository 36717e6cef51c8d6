"""Packed sequences: several records in one row of a batch, with `segments` (which record
each position belongs to) and `positions` (where in its record). The logits of a packed
row must equal those of each record run on its own: attention never crosses a boundary,
and rotary and learned positions restart at each record."""

import pytest
import torch

from effc.compiler.lower import lower_arch
from effc.kernels.attention import attention, attention_ref
from effc.lang.tree import Arch
from effc.runtime.model import materialize

ARCHS = {
    "rope_gqa": Arch(vocab=50, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=40, seq=24),
    "learned_gelu": Arch(vocab=50, dim=32, layers=2, heads=4, kv_heads=4, head_dim=8, ffn=40, seq=24,
                         norm="layer", positions="learned", mlp="gelu_tanh", qkv_bias=True, o_bias=True,
                         mlp_bias=True, tied=True),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_a_packed_row_equals_its_records_run_alone(name):
    ir = lower_arch(ARCHS[name], None)
    gm, _ = materialize(ir, 24, {}, seed=3, output="logits")
    g = torch.Generator().manual_seed(0)
    lengths = [7, 11, 5]  # three records packed into one row of 23 tokens
    records = [torch.randint(0, 50, (1, n), generator=g) for n in lengths]
    tokens = torch.cat(records, dim=1)
    segments = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    positions = torch.cat([torch.arange(n)[None] for n in lengths], dim=1)
    with torch.no_grad():
        packed = gm(tokens, segments, positions)
        alone = torch.cat([gm(r) for r in records], dim=1)
        unpacked = gm(tokens)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert (unpacked[:, lengths[0]:] - alone[:, lengths[0]:]).abs().max() > 1e-3  # without them, records mix


def test_segment_mask_against_the_textbook_formula():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 12, generator=g, dtype=torch.float64) for _ in range(3))
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 3]])
    torch.testing.assert_close(attention(q, k, v, 3, 3, segments_BT=seg), attention_ref(q, k, v, 3, 3, segments_BT=seg))
    # the first position of each record sees only itself: its output is its own value
    first = seg != torch.nn.functional.pad(seg, (1, 0), value=-1)[:, :-1]
    torch.testing.assert_close(attention(q, k, v, 3, 3, segments_BT=seg)[first], v[first])
