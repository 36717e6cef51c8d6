"""Quantization kernels (kernels/quant.py), each against a reference written here: the storage
format's formulas evaluated group by group, a hand-packed byte example, the published NF4
table, GPTQ as the paper's explicit inverse-Hessian (OBS) updates, LSQ's gradient formulas,
and x @ W.T + b for the linear ops, plus torch.library.opcheck for each op.
"""

import math

import pytest
import torch

from effc.kernels import quant as Q

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- packing


def test_pack_nibble_order_hand_example():
    q = torch.tensor([[1, 2, 15, 0], [3, 4, 5, 6]], dtype=torch.uint8)
    # column 2j in the low nibble, 2j + 1 in the high nibble
    expected = torch.tensor([[0x21, 0x0F], [0x43, 0x65]], dtype=torch.uint8)
    assert torch.equal(Q.pack_int4(q), expected)
    assert torch.equal(Q.unpack_int4(expected), q)


def test_pack_round_trip_odd_rows():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (7, 18), generator=g, dtype=torch.uint8)
    packed = Q.pack_int4(q)
    assert packed.shape == (7, 9) and packed.dtype == torch.uint8
    assert torch.equal(Q.unpack_int4(packed), q)


# ----------------------------------------------------------------------------- int8 / int4 RTN


def ref_int8(w):
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    for r in range(w.shape[0]):
        m = w[r].abs().max()
        s = m / 127 if m > 0 else torch.tensor(1.0)
        scale[r] = s
        q[r] = torch.clamp(torch.round(w[r] / s), -127, 127).to(torch.int8)
    return q, scale


def ref_int4(w, g):
    out, inp = w.shape
    q = torch.empty(out, inp, dtype=torch.uint8)
    scale = torch.empty(out, inp // g)
    zero = torch.empty(out, inp // g, dtype=torch.uint8)
    for r in range(out):
        for k in range(inp // g):
            grp = w[r, k * g : (k + 1) * g]
            lo = torch.clamp(grp.min(), max=0)
            hi = torch.clamp(grp.max(), min=0)
            s = (hi - lo) / 15 if hi != lo else torch.tensor(1.0)
            z = torch.clamp(torch.round(-lo / s), 0, 15)
            scale[r, k], zero[r, k] = s, z
            q[r, k * g : (k + 1) * g] = torch.clamp(torch.round(grp / s) + z, 0, 15).to(torch.uint8)
    return q, scale, zero


def with_zero_rows(w):
    w = w.clone()
    w[1] = 0.0  # an all-zero row / group takes scale 1.0
    w[2, :10] = torch.linspace(0.1, 1.0, 10)  # an all-positive group: lo clamps to 0
    return w


def test_int8_matches_reference_and_error_bound():
    w = with_zero_rows(randn(7, 30))
    d = Q.quantize_int8(w)
    q_ref, s_ref = ref_int8(w)
    assert d["qweight"].dtype == torch.int8 and d["scale"].dtype == torch.float32
    assert torch.equal(d["qweight"], q_ref) and torch.equal(d["scale"], s_ref)
    assert s_ref[1] == 1.0
    deq = Q.dequantize_int8(d["qweight"], d["scale"])
    assert torch.equal(deq, q_ref.float() * s_ref[:, None])
    assert ((deq - w).abs() <= s_ref[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("shape,g", [((7, 30), 10), ((5, 64), 32), ((3, 12), 2)])
def test_int4_rtn_matches_reference_and_error_bound(shape, g):
    w = with_zero_rows(randn(*shape, seed=2))
    d = Q.quantize_int4_rtn(w, g)
    q_ref, s_ref, z_ref = ref_int4(w, g)
    assert d["qweight"].shape == (shape[0], shape[1] // 2)
    assert torch.equal(Q.unpack_int4(d["qweight"]), q_ref)
    assert torch.equal(d["scale"], s_ref) and torch.equal(d["zero"], z_ref)
    assert d["zero"].dtype == torch.uint8
    deq = Q.dequantize_int4(d["qweight"], d["scale"], d["zero"], g)
    s_full = s_ref.repeat_interleave(g, 1)
    expected = (q_ref.float() - z_ref.float().repeat_interleave(g, 1)) * s_full
    assert torch.equal(deq, expected)
    assert ((deq - w).abs() <= s_full / 2 * (1 + 1e-5)).all()
    assert (deq[1] == 0).all()


# ----------------------------------------------------------------------------- NF4

# QLoRA (Dettmers et al. 2023) appendix E / bitsandbytes' NF4 table, typed in independently.
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_code_book_is_published_table():
    assert Q.NF4_CODE.dtype == torch.float32
    assert torch.equal(Q.NF4_CODE, torch.tensor(NF4_PUBLISHED, dtype=torch.float32))


def ref_nf4(w, g):
    code = torch.tensor(NF4_PUBLISHED, dtype=torch.float32)
    out, inp = w.shape
    q = torch.empty(out, inp, dtype=torch.uint8)
    absmax = torch.empty(out, inp // g)
    for r in range(out):
        for k in range(inp // g):
            blk = w[r, k * g : (k + 1) * g]
            m = blk.abs().max()
            m = m if m > 0 else torch.tensor(1.0)
            absmax[r, k] = m
            # nearest code by brute force over all 16 (argmin: first index on a tie)
            dist = ((blk / m)[:, None] - code[None, :]).abs()
            q[r, k * g : (k + 1) * g] = dist.argmin(1).to(torch.uint8)
    return q, absmax


def test_nf4_matches_reference():
    w = with_zero_rows(randn(7, 40, seed=3))
    w[3, 5] = w[3, :10].abs().max()  # hits code 1.0 exactly
    d = Q.quantize_nf4(w, 10)
    q_ref, a_ref = ref_nf4(w, 10)
    assert set(d) == {"qweight", "absmax"}
    assert torch.equal(Q.unpack_int4(d["qweight"]), q_ref)
    assert torch.equal(d["absmax"], a_ref)
    code = torch.tensor(NF4_PUBLISHED, dtype=torch.float32)
    expected = code[q_ref.long()] * a_ref.repeat_interleave(10, 1)
    assert torch.equal(Q.dequantize_nf4(d["qweight"], 10, absmax=d["absmax"]), expected)
    assert torch.equal(Q.dequantize_nf4(group=10, **d), expected)


def test_nf4_ties_and_midpoints():
    # values exactly on a code and at float32 midpoints between codes, against the brute force
    code = torch.tensor(NF4_PUBLISHED, dtype=torch.float32)
    mids = (code[1:] + code[:-1]) / 2
    x = torch.cat([code, mids, torch.nextafter(mids, torch.tensor(2.0)),
                   torch.nextafter(mids, torch.tensor(-2.0))])  # fmt: skip
    w = torch.cat([x, x.new_zeros(3)]).reshape(1, 64)  # one block; absmax 1.0 from the codes
    q_ref, _ = ref_nf4(w, w.shape[1])
    d = Q.quantize_nf4(w, w.shape[1])
    assert torch.equal(Q.unpack_int4(d["qweight"]), q_ref)


def test_nf4_double_quant_reference_and_bound():
    g = 8
    w = randn(37, 64, seed=4) * torch.linspace(0.1, 3, 37)[:, None]  # 296 absmax: 2 DQ blocks
    w[5] = 0.0
    d = Q.quantize_nf4(w, g, double_quant=True)
    assert set(d) == {"qweight", "absmax_q", "absmax_scale", "absmax_mean"}
    _, a = ref_nf4(w, g)
    flat = a.reshape(-1)
    mean = flat.mean()
    c = flat - mean
    n = flat.numel()
    assert d["absmax_scale"].shape == (math.ceil(n / 256),) and d["absmax_mean"].shape == (1,)
    q_ref = torch.empty(n, dtype=torch.int8)
    for b in range(0, n, 256):
        m = c[b : b + 256].abs().max()
        s = m / 127 if m > 0 else torch.tensor(1.0)
        assert d["absmax_scale"][b // 256] == s
        q_ref[b : b + 256] = torch.clamp(torch.round(c[b : b + 256] / s), -127, 127).to(torch.int8)
    assert torch.equal(d["absmax_q"], q_ref.view(37, 64 // g))
    assert torch.equal(d["absmax_mean"], mean.reshape(1))
    decoded = Q.nf4_absmax(d["absmax_q"], d["absmax_scale"], d["absmax_mean"])
    s_each = d["absmax_scale"].repeat_interleave(256)[:n].view(37, 64 // g)
    assert ((decoded - a).abs() <= s_each / 2 * (1 + 1e-5) + 1e-6).all()
    # dequantize from the double-quantized form = plain dequantize with the decoded absmax
    plain = Q.dequantize_nf4(d["qweight"], g, absmax=decoded)
    assert torch.equal(Q.dequantize_nf4(group=g, **d), plain)


# ----------------------------------------------------------------------------- GPTQ


def calibration(n=512, inp=64, seed=5):
    # correlated inputs (x = z M) so that H is far from diagonal
    return randn(n, inp, seed=seed) @ randn(inp, inp, seed=seed + 1)


def ref_gptq(w, H, g, damp):
    """GPTQ as the paper's eqs. (2)-(3): quantize column j, spread its error over the columns
    not yet quantized with the explicit inverse Hessian, then eliminate j from that inverse.
    float64 throughout; group params from the updated weights when a group starts."""
    W = w.double().clone()
    H = H.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    q = torch.empty(w.shape, dtype=torch.int64)
    for j in range(W.shape[1]):
        if j % g == 0:
            grp = W[:, j : j + g]
            lo = grp.min(1).values.clamp(max=0)
            hi = grp.max(1).values.clamp(min=0)
            s = (hi - lo) / 15
            z = torch.round(-lo / s).clamp(0, 15)
        q[:, j] = (torch.round(W[:, j] / s) + z).clamp(0, 15).long()
        err = (W[:, j] - (q[:, j] - z) * s) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv -= Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return q


def layer_error(w, X):
    return (X @ w.T).pow(2).sum().item()


def test_hessian_accumulator():
    X = calibration()
    acc = Q.HessianAccumulator(64)
    acc.add(X[:200].reshape(8, 25, 64))  # (..., in) batches of any leading shape
    acc.add(X[200:])
    assert acc.sum.dtype == torch.float64 and acc.n == 512
    Xd = X.double()
    torch.testing.assert_close(acc.H, 2 / 512 * Xd.T @ Xd, rtol=1e-12, atol=1e-9)


def test_gptq_matches_obs_reference():
    w = randn(24, 64, seed=7)
    X = calibration()
    H = 2 / X.shape[0] * X.double().T @ X.double()
    d = Q.gptq_int4(w, H, group=16, damp=0.01, block=32)
    q_ref = ref_gptq(w, H, 16, 0.01)
    assert torch.equal(Q.unpack_int4(d["qweight"]).long(), q_ref)


def test_gptq_beats_rtn_on_calibration_data():
    w = randn(24, 64, seed=8)
    X = calibration(seed=9)
    acc = Q.HessianAccumulator(64)
    acc.add(X)
    rtn = Q.dequantize_int4(**Q.quantize_int4_rtn(w, 16), group=16)
    for block in (16, 32, 128):
        gptq = Q.dequantize_int4(**Q.gptq_int4(w, acc.H, group=16, block=block), group=16)
        e_gptq, e_rtn = layer_error(w - gptq, X), layer_error(w - rtn, X)
        assert e_gptq < 0.8 * e_rtn, (block, e_gptq, e_rtn)


def test_gptq_identity_hessian_is_rtn():
    # H = I: the inverse Hessian is diagonal, no error is fed forward, so GPTQ is RTN exactly
    w = with_zero_rows(randn(9, 48, seed=10))
    rtn = Q.quantize_int4_rtn(w, 16)
    for block in (16, 20, 128):
        d = Q.gptq_int4(w, torch.eye(48), group=16, block=block)
        for k in rtn:
            assert torch.equal(d[k], rtn[k]), (block, k)


def test_gptq_dead_columns():
    w = randn(6, 32, seed=11)
    X = calibration(n=128, inp=32, seed=12)
    X[:, [3, 17]] = 0.0  # inputs that never fire: H has zero diagonal there
    acc = Q.HessianAccumulator(32)
    acc.add(X)
    d = Q.gptq_int4(w, acc.H, group=16)
    deq = Q.dequantize_int4(**d, group=16)
    assert torch.isfinite(deq).all()
    assert (deq[:, [3, 17]] == 0).all()  # GPTQ zeroes dead columns; 0 is always representable


# ----------------------------------------------------------------------------- LSQ


@pytest.mark.parametrize("bits,g", [(4, 8), (3, 3)])  # LSQ groups need not be even
def test_lsq_forward_and_gradients(bits, g):
    w = randn(5, 24, seed=13, dtype=torch.float64).requires_grad_()
    gen = torch.Generator().manual_seed(14)
    step = torch.rand(5, 24 // g, generator=gen, dtype=torch.float64) * 0.3 + 0.05
    step.requires_grad_()
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    y = Q.fake_quant_lsq(w, step, bits, g)
    s = step.detach().repeat_interleave(g, 1)
    v = w.detach() / s
    assert torch.equal(y.detach(), torch.clamp(torch.round(v), -qn, qp) * s)
    assert (v <= -qn).any() and (v >= qp).any() and ((v > -qn) & (v < qp)).any()

    gy = randn(5, 24, seed=15, dtype=torch.float64)
    gw, gs = torch.autograd.grad(y, (w, step), gy)
    inside = (v > -qn) & (v < qp)
    assert torch.equal(gw, gy * inside)
    # LSQ eq. (3): d w_q / d s = -v + round(v) inside, -Qn below, Qp above; times g (eq. 4)
    ds = torch.where(v <= -qn, -qn, torch.where(v >= qp, qp, -v + torch.round(v)))
    gs_ref = (gy * ds).view(5, 24 // g, g).sum(-1) / math.sqrt(g * qp)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-12, atol=1e-12)


def test_lsq_init_step():
    w = randn(4, 32, seed=16)
    step = Q.lsq_init_step(w, 4, 16)
    ref = torch.empty(4, 2)
    for r in range(4):
        for k in range(2):
            ref[r, k] = 2 * w[r, k * 16 : (k + 1) * 16].abs().mean() / math.sqrt(7)
    torch.testing.assert_close(step, ref, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- linear ops

OUT, IN, GROUP = 37, 64, 32


def quantized(kind):
    """(op(x, bias), dequantized W, op name, args between x and bias)"""
    w = randn(OUT, IN, seed=17)
    if kind == "int8":
        d = Q.quantize_int8(w)
        args = (d["qweight"], d["scale"])
        return Q.int8_linear, Q.dequantize_int8(*args), args
    if kind == "int4":
        d = Q.quantize_int4_rtn(w, GROUP)
        args = (d["qweight"], d["scale"], d["zero"], GROUP)
        return Q.int4_linear, Q.dequantize_int4(*args), args
    d = Q.quantize_nf4(w, GROUP, double_quant=True)
    absmax = Q.nf4_absmax(d["absmax_q"], d["absmax_scale"], d["absmax_mean"])
    args = (d["qweight"], absmax, GROUP)
    return Q.nf4_linear, Q.dequantize_nf4(d["qweight"], GROUP, absmax=absmax), args


KINDS = ["int8", "int4", "nf4"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_op_output_and_grads(kind, has_bias):
    op, W, args = quantized(kind)
    x = randn(3, 5, IN, seed=18).requires_grad_()
    b = randn(OUT, seed=19).requires_grad_() if has_bias else None
    y = op(x, *args, b)
    ref = x @ W.T + (b if has_bias else 0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = randn(*y.shape, seed=20)
    leaves = (x, b) if has_bias else (x,)
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(ref, leaves, gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert not any(t.requires_grad for t in args if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("kind", KINDS)
def test_linear_op_bf16_x(kind):
    op, W, args = quantized(kind)
    x = randn(4, IN, seed=21).to(torch.bfloat16).requires_grad_()
    b = randn(OUT, seed=22)
    y = op(x, *args, b)
    assert y.dtype == torch.bfloat16
    # fp32 math, one rounding to bf16 at the end
    assert torch.equal(y, (x.float() @ W.T + b).to(torch.bfloat16))
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert gx.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_op_opcheck(kind, has_bias):
    op, _, args = quantized(kind)
    x = randn(3, 5, IN, seed=23).requires_grad_()
    b = randn(OUT, seed=24).requires_grad_() if has_bias else None
    torch.library.opcheck(getattr(torch.ops.effc, f"{kind}_linear").default, (x, *args, b))
