"""normfuse.layer_norm against the float64 reference and against torch.nn.functional.layer_norm."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import normfuse
from normfuse import functional, reference
from tests._helpers import assert_same_error, FWD_TOL, LOW_PRECISION, max_rel_err, norm_err, per_thread_count
from tests._helpers import skip_where_older_torch_differs

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# ||grad - reference|| / ||reference||: rounding of the stored gradient dominates
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _make(shape, normalized_shape, dtype, param_dtype=None, affine=True, with_bias=True, offset=0.0, device="cpu"):
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape, dtype=torch.float64) * 2 + offset).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(normalized_shape, dtype=torch.float64)).to(param_dtype).to(device) if affine else None
    b = (
        (0.5 * torch.randn(normalized_shape, dtype=torch.float64)).to(param_dtype).to(device)
        if affine and with_bias
        else None
    )
    return x, w, b


def _grads(fn, x, normalized_shape, w, b, dy):
    inputs = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    it = iter(inputs)
    xg = next(it)
    wg = next(it) if w is not None else None
    bg = next(it) if b is not None else None
    out = fn(xg, normalized_shape, wg, bg, 1e-5)
    grads = torch.autograd.grad(out, inputs, dy)
    it = iter(grads)
    return out.detach(), next(it), next(it) if w is not None else None, next(it) if b is not None else None


def _cpu(*tensors):
    return [t.cpu() if t is not None else None for t in tensors]


def _check_against_reference(x, normalized_shape, w, b, dtype):
    dy = torch.randn(x.shape, dtype=torch.float64).to(x.dtype).to(x.device)
    out, dx, dw, db = _grads(normfuse.layer_norm, x, normalized_shape, w, b, dy)
    assert out.dtype == x.dtype and out.shape == x.shape and out.is_contiguous() and out.device == x.device
    x, w, b, dy, out, dx, dw, db = _cpu(x, w, b, dy, out, dx, dw, db)
    ref = reference.layer_norm(x, normalized_shape, w, b, 1e-5)
    assert max_rel_err(out, ref) <= FWD_TOL[dtype]
    rdx, rdw, rdb = reference.layer_norm_backward(dy, x, normalized_shape, w, 1e-5)
    assert dx.dtype == x.dtype
    # dx = rstd * (g - xhat * mean(xhat * g) - mean(g)) with g = dy * w is a difference of terms
    # of size rstd * |g|; rounding errors scale with those terms, not with the (possibly nearly
    # cancelled, e.g. two features) result. Bound the error by the larger of the two.
    x64 = x.double().reshape(-1, math.prod(normalized_shape))
    rstd = torch.rsqrt(x64.var(-1, unbiased=False, keepdim=True) + 1e-5)
    g = dy.double().reshape(x64.shape) * (w.double().reshape(-1) if w is not None else 1)
    term_scale = (rstd * g).norm().item()
    assert (dx.double() - rdx).norm().item() <= GRAD_TOL[dtype] * max(rdx.norm().item(), term_scale)
    if w is not None:
        assert dw.dtype == w.dtype and dw.shape == w.shape
        assert norm_err(dw, rdw) <= GRAD_TOL[w.dtype]
    if b is not None:
        assert db.dtype == b.dtype
        assert norm_err(db, rdb) <= GRAD_TOL[b.dtype]
    return out, dx, dw, db, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,normalized_shape",
    [((4, 32), (32,)), ((3, 5, 100), (100,)), ((2, 3, 4, 7), (4, 7)), ((6, 2, 3, 5), (2, 3, 5)), ((64, 1000), (1000,))],
)
@pytest.mark.parametrize("affine,with_bias", [(True, True), (True, False), (False, False)])
def test_matches_reference_and_torch(dtype, shape, normalized_shape, affine, with_bias, device):
    x, w, b = _make(shape, normalized_shape, dtype, affine=affine, with_bias=with_bias, device=device)
    out, dx, dw, db, dy = _check_against_reference(x, normalized_shape, w, b, dtype)
    x, w, b = _cpu(x, w, b)
    tout, tdx, tdw, tdb = _grads(F.layer_norm, x, normalized_shape, w, b, dy)
    # no worse than torch, up to a few units of the dtype's rounding
    ref = reference.layer_norm(x, normalized_shape, w, b, 1e-5)
    assert max_rel_err(out, ref) <= max_rel_err(tout, ref) + FWD_TOL[dtype] / 2
    assert max_rel_err(out, tout) <= 2 * FWD_TOL[dtype]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_input_with_fp32_parameters(dtype, device):
    x, w, b = _make((16, 48), (48,), dtype, param_dtype=torch.float32, device=device)
    out, dx, dw, db, _ = _check_against_reference(x, (48,), w, b, dtype)
    x, w, b = _cpu(x, w, b)
    assert out.dtype == dtype and dx.dtype == dtype
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    assert torch.equal(out, F.layer_norm(x, (48,), w, b)) or max_rel_err(out, F.layer_norm(x, (48,), w, b)) <= 2 * (
        FWD_TOL[dtype]
    )


@st.composite
def _cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    normalized_shape = tuple(draw(st.lists(st.integers(1, 70), min_size=1, max_size=2)))
    lead = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=3)))
    affine = draw(st.booleans())
    with_bias = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    offset = draw(st.sampled_from([0.0, 10.0, -300.0]))
    return dtype, normalized_shape, lead, affine, with_bias, layout, offset


def _layout(x: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    """The same values as x in a non-contiguous view of the given kind."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "strided":
        wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded" and x.dim() > k and x.shape[0] > 0:
        return x[:1].expand(x.shape)
    return x


@pytest.mark.parametrize("on", ["cpu", "cuda"])
@given(_cases())
def test_random_shapes_layouts_and_dtypes(on, case):
    if on == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    dtype, normalized_shape, lead, affine, with_bias, layout, offset = case
    x, w, b = _make(lead + normalized_shape, normalized_shape, dtype, affine=affine, with_bias=with_bias, offset=offset)
    x = _layout(x, layout, len(normalized_shape)).to(on) if on != "cpu" else _layout(x, layout, len(normalized_shape))
    w, b = (t.to(on) if t is not None else None for t in (w, b))
    x_before = x.clone()
    _check_against_reference(x, normalized_shape, w, b, dtype)
    assert torch.equal(x, x_before)
    # a strided view gives exactly what its contiguous copy gives
    assert torch.equal(normfuse.layer_norm(x, normalized_shape, w, b), normfuse.layer_norm(x.contiguous(), normalized_shape, w, b))


def test_inputs_are_never_modified():
    x, w, b = _make((8, 64), (64,), torch.float32)
    dy = torch.randn(8, 64)
    copies = [t.clone() for t in (x, w, b, dy)]
    _grads(normfuse.layer_norm, x, (64,), w, b, dy)
    normfuse.layer_norm(x, (64,), w, b)
    for before, after in zip(copies, (x, w, b, dy)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows(dtype):
    x, w, b = _make((0, 3, 16), (16,), dtype)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    out = normfuse.layer_norm(xg, (16,), wg, bg)
    assert out.shape == (0, 3, 16) and out.dtype == dtype
    out.sum().backward()
    assert torch.equal(wg.grad, torch.zeros_like(w)) and torch.equal(bg.grad, torch.zeros_like(b))
    assert xg.grad.shape == x.shape


def test_zero_features_like_torch():
    x = torch.randn(3, 0)
    assert normfuse.layer_norm(x, (0,)).shape == F.layer_norm(x, (0,)).shape == (3, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_feature(dtype, device):
    x, w, b = _make((50, 1), (1,), dtype, device=device)
    out, dx, dw, db = _grads(normfuse.layer_norm, x, (1,), w, b, torch.randn(50, 1).to(dtype).to(device))
    assert torch.equal(out, b.expand(50, 1).to(dtype))
    assert torch.equal(dx, torch.zeros_like(dx))
    assert torch.equal(dw, torch.zeros_like(dw))  # torch gives a tiny non-zero value here


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_poison_only_their_row(dtype, device):
    x, w, b = _make((6, 40), (40,), dtype)
    x[1, 3] = math.nan
    x[3, 0] = math.inf
    x[4, 39] = -math.inf
    out = normfuse.layer_norm(x.to(device), (40,), w.to(device), b.to(device)).cpu()
    expected = F.layer_norm(x, (40,), w, b)
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[[1, 3, 4]].isnan().all()
    clean = [0, 2, 5]
    assert max_rel_err(out[clean], reference.layer_norm(x[clean], (40,), w, b)) <= FWD_TOL[dtype]


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4, 1e5, 1e6])
def test_large_mean_no_worse_than_torch(offset, device):
    """Rows of offset + N(0, 1) in float32: forward and dx errors against float64."""
    x = (offset + torch.randn(128, 2048, dtype=torch.float64)).float()
    w = 1 + 0.1 * torch.randn(2048)
    b = 0.1 * torch.randn(2048)
    dy = torch.randn(128, 2048)
    on_device = [t.to(device) for t in (x, w, b, dy)]
    out, dx, _, _ = (t.cpu() for t in _grads(normfuse.layer_norm, on_device[0], (2048,), *on_device[1:3], on_device[3]))
    tout, tdx, _, _ = _grads(F.layer_norm, x, (2048,), w, b, dy)
    ref = reference.layer_norm(x, (2048,), w, b)
    rdx, _, _ = reference.layer_norm_backward(dy, x, (2048,), w)
    fwd_err, torch_fwd_err = (out.double() - ref).abs().max().item(), (tout.double() - ref).abs().max().item()
    dx_err, torch_dx_err = norm_err(dx, rdx), norm_err(tdx, rdx)
    assert fwd_err <= max(torch_fwd_err, 2e-6)
    assert dx_err <= max(torch_dx_err, 2e-6)
    # centered backward: dx accuracy does not depend on the mean
    assert dx_err < 1e-6


def test_naive_variance_would_fail_here():
    """Guard that the large-mean test above is discriminating: E[x^2] - E[x]^2 breaks at 1e4."""
    x = (1e4 + torch.randn(64, 1024, dtype=torch.float64)).float()
    naive_var = (x * x).mean(-1) - x.mean(-1) ** 2
    true_var = x.double().var(-1, unbiased=False)
    assert (naive_var.double() - true_var).abs().max() > 0.5
    out = normfuse.layer_norm(x, (1024,))
    assert max_rel_err(out, reference.layer_norm(x, (1024,))) < 1e-4


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_dweight_accumulates_in_fp32(dtype):
    """8192 rows of bf16/fp16: dgamma and dbeta within the dtype's final rounding."""
    x, w, b = _make((8192, 64), (64,), dtype)
    dy = torch.randn(8192, 64).to(dtype)
    _, _, dw, db = _grads(normfuse.layer_norm, x, (64,), w, b, dy)
    _, rdw, rdb = reference.layer_norm_backward(dy, x, (64,), w)
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # one rounding of the result
    assert ((dw.double() - rdw).abs() / rdw.abs()).max() <= unit
    assert ((db.double() - rdb).abs() / rdb.abs()).max() <= unit


@pytest.mark.parametrize("dtype", DTYPES)
def test_dweight_bitwise_identical_across_thread_counts(dtype):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs at least 2 numba threads to compare thread counts")
    x, w, b = _make((3000, 256), (256,), dtype)
    dy = torch.randn(3000, 256).to(dtype)
    counts = (1, numba.config.NUMBA_NUM_THREADS)
    results = per_thread_count(lambda: _grads(normfuse.layer_norm, x, (256,), w, b, dy), counts)
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.parametrize(
    "shape,normalized_shape,affine,with_bias",
    [((3, 7), (7,), True, True), ((2, 3, 4), (3, 4), True, False), ((4, 5), (5,), False, False), ((5, 1), (1,), True, True)],
)
def test_gradcheck_and_gradgradcheck(shape, normalized_shape, affine, with_bias, device):
    x, w, b = _make(shape, normalized_shape, torch.float64, affine=affine, with_bias=with_bias, device=device)
    inputs = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        return normfuse.layer_norm(xx, normalized_shape, ww, bb)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_only_requested_gradients_are_computed():
    x, w, b = _make((4, 16), (16,), torch.float32)
    w.requires_grad_()
    out = normfuse.layer_norm(x, (16,), w, b)
    (dw,) = torch.autograd.grad(out, (w,), torch.ones_like(out))
    assert dw.shape == w.shape
    assert x.grad is None and b.grad is None


# --- errors: same type and text as torch --------------------------------------------------------

_x = torch.randn(3, 5)
ERROR_CASES = {
    "trailing shape": lambda f: f(_x, (4,)),
    "too few dims": lambda f: f(torch.randn(5), (3, 5)),
    "scalar input": lambda f: f(torch.tensor(1.0), (1,)),
    "negative size": lambda f: f(_x, (-1,)),
    "empty normalized_shape": lambda f: f(_x, ()),
    "weight shape": lambda f: f(_x, (5,), torch.ones(4)),
    "weight rank": lambda f: f(_x, (5,), torch.ones(1, 5)),
    "bias shape": lambda f: f(_x, (5,), None, torch.ones(4)),
    "long input": lambda f: f(_x.long(), (5,)),
    "int input": lambda f: f(_x.int(), (5,)),
    "bool input": lambda f: f(_x.bool(), (5,)),
    "complex input": lambda f: f(_x.to(torch.complex64), (5,)),
    "int input wrong shape": lambda f: f(_x.int(), (4,)),
    "f64 input f32 weight": lambda f: f(_x.double(), (5,), torch.ones(5)),
    "f64 input f32 bias": lambda f: f(_x.double(), (5,), None, torch.ones(5)),
    "f32 input f64 weight": lambda f: f(_x, (5,), torch.ones(5).double()),
    "f32 input bf16 weight": lambda f: f(_x, (5,), torch.ones(5).bfloat16()),
    "f32 input int weight": lambda f: f(_x, (5,), torch.ones(5).int()),
    "bf16 input f16 weight": lambda f: f(_x.bfloat16(), (5,), torch.ones(5).half()),
    "bf16 input f32 weight bf16 bias": lambda f: f(_x.bfloat16(), (5,), torch.ones(5), torch.ones(5).bfloat16()),
    "bf16 input bf16 weight f32 bias": lambda f: f(_x.bfloat16(), (5,), torch.ones(5).bfloat16(), torch.ones(5)),
    "f64 input f64 weight f32 bias": lambda f: f(_x.double(), (5,), torch.ones(5).double(), torch.ones(5)),
    "int input wrong weight shape": lambda f: f(_x.int(), (5,), torch.ones(4)),
    "normalized_shape int": lambda f: f(_x, 5),
    "normalized_shape str": lambda f: f(_x, "5"),
    "normalized_shape float element": lambda f: f(_x, (5.0,)),
    "normalized_shape bool element": lambda f: f(_x, (True,)),
    "input a numpy array": lambda f: f(np.ones((3, 5)), (5,)),
    "input None": lambda f: f(None, (5,)),
    "input a list": lambda f: f([[1.0] * 5], (5,)),
    "normalized_shape numpy array": lambda f: f(_x, np.array([5])),
    "normalized_shape numpy bool element": lambda f: f(_x, (np.bool_(True),)),
    "normalized_shape float tensor element": lambda f: f(_x, (torch.tensor(5.0),)),
    "normalized_shape bool tensor element": lambda f: f(_x, (torch.tensor(True),)),
    "normalized_shape 2-element tensor element": lambda f: f(_x, (torch.tensor([5, 5]),)),
    "weight not a tensor": lambda f: f(_x, (5,), 3),
    "eps None": lambda f: f(_x, (5,), None, None, None),
    "eps a string": lambda f: f(_x, (5,), None, None, "0.1"),
    "eps a 1-element 1-dim tensor": lambda f: f(_x, (5,), None, None, torch.tensor([0.1])),
    "eps a tensor that requires grad": lambda f: f(_x, (5,), None, None, torch.tensor(0.1, requires_grad=True)),
    "eps a complex tensor": lambda f: f(_x, (5,), None, None, torch.tensor(1 + 1j)),
    "eps a meta tensor": lambda f: f(_x, (5,), None, None, torch.tensor(0.1, device="meta")),
    "weight on another device": lambda f: f(_x, (5,), torch.ones(5, device="meta")),
    "bias on another device": lambda f: f(_x, (5,), None, torch.ones(5, device="meta")),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_match_torch(case):
    assert_same_error(ERROR_CASES[case], F.layer_norm, normfuse.layer_norm)


def test_accepted_argument_forms_match_torch():
    x = torch.randn(3, 5)
    int_subclass = type("Size", (int,), {})
    for shape in ((5,), [5], torch.Size([5]), (torch.tensor(5),), (np.int64(5),), [np.uint8(5)], (torch.tensor([[5]], dtype=torch.uint8),),
                  (int_subclass(5),)):  # fmt: skip
        assert torch.equal(F.layer_norm(x, shape), F.layer_norm(x, (5,))), shape
        assert torch.equal(normfuse.layer_norm(x, shape), normfuse.layer_norm(x, (5,)))
    assert max_rel_err(normfuse.layer_norm(x, (5,), eps=1), F.layer_norm(x, (5,), eps=1)) < 1e-6
    # what torch's parser takes for a float: bool, numpy scalars, 0-dim tensors not requiring grad
    for eps in (True, np.float32(0.5), np.int64(2), np.bool_(True), torch.tensor(0.5), torch.tensor(2), torch.tensor(0.5).bfloat16()):
        assert torch.equal(normfuse.layer_norm(x, (5,), eps=eps), normfuse.layer_norm(x, (5,), eps=float(eps))), eps
        assert max_rel_err(normfuse.layer_norm(x, (5,), eps=eps), F.layer_norm(x, (5,), eps=eps)) < 1e-6, eps


# --- the direct paths: token-sized inference, eager training (functional._direct_path) -----------


def _count_general_checks(monkeypatch):
    """Calls of the general path's input checks, which the direct path skips."""
    calls = []
    for name in ("_check_layer_norm_inputs", "_check_rms_norm_inputs"):
        real = getattr(functional, name)

        def record(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(functional, name, record)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (8, 768), (2, 3, 5), (0, 16), (7, 1)])
@pytest.mark.parametrize("params", ["tensors", "parameters", "none"])
def test_direct_inference_path_gives_the_general_path_s_bits(dtype, shape, params, monkeypatch):
    n = shape[-1]
    x, w, b = _make(shape, (n,), dtype)
    if params == "parameters":
        w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
    elif params == "none":
        w = b = None
    with torch.no_grad():
        with normfuse.use_backend("cpu"):  # a forced backend takes the general path
            general_ln = normfuse.layer_norm(x, (n,), w, b)
            general_rms = normfuse.rms_norm(x, (n,), w)
            general_rms_eps = normfuse.rms_norm(x, (n,), w, 1e-3)
        calls = _count_general_checks(monkeypatch)
        direct = [normfuse.layer_norm(x, (n,), w, b), normfuse.rms_norm(x, (n,), w), normfuse.rms_norm(x, (n,), w, 1e-3)]
    assert calls == []
    for got, want in zip(direct, (general_ln, general_rms, general_rms_eps)):
        assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
        assert torch.equal(got, want)


def test_direct_inference_path_declines_what_it_does_not_check(monkeypatch):
    x = torch.randn(4, 32)
    w, b = torch.randn(32), torch.randn(32)
    declined = {
        "list shape": lambda: normfuse.layer_norm(x, [32], w, b),
        "two normalized dims": lambda: normfuse.layer_norm(x.view(4, 4, 8), (4, 8), w.view(4, 8), b.view(4, 8)),
        "non-contiguous": lambda: normfuse.layer_norm(x.t().contiguous().t(), (32,), w, b),
        "x requires grad, list shape": lambda: normfuse.layer_norm(x.clone().requires_grad_(), [32], w, b),
        "fp32 weight, bf16 bias": lambda: normfuse.layer_norm(x.bfloat16(), (32,), w, b.bfloat16()),
        "fp32 weight, fp64 x": lambda: normfuse.layer_norm(x.double(), (32,), w, b),
        "int eps": lambda: normfuse.layer_norm(x, (32,), w, b, 1),
        "weight shape": lambda: normfuse.layer_norm(x, (32,), w[:16], b),
        # the family options go direct where they are the kinds the general path checks for
        "rms int weight_offset": lambda: normfuse.rms_norm(x, (32,), w, weight_offset=1),
        "rms xhat_dtype, list shape": lambda: normfuse.rms_norm(x, [32], w, xhat_dtype=torch.float32),
    }
    calls = _count_general_checks(monkeypatch)
    for name, call in declined.items():
        before = len(calls)
        try:
            call()
        except RuntimeError:
            # torch's errors, from the general path's checks
            assert name in ("weight shape", "fp32 weight, bf16 bias", "fp32 weight, fp64 x"), name
        assert len(calls) == before + 1, name
    with torch.no_grad():
        normfuse.layer_norm(x, (32,), torch.nn.Parameter(w), b)  # no grad mode: nothing requires grad
        normfuse.rms_norm(x, (32,), w, weight_offset=0.0)
        normfuse.rms_norm(x, (32,), w, weight_offset=1.0, xhat_dtype=torch.float32, rstd_dtype=torch.float32)
    assert len(calls) == len(declined)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_direct_paths_take_float32_parameters_of_half_input(dtype, requires_grad, monkeypatch):
    """bf16/fp16 input with float32 weight and bias (torch's mixed-dtype case) takes the direct
    paths too, inference and training: the general path's bits, output in the input's dtype."""
    shape, n = (3, 5, 96), 96
    x, w, b = _make(shape, (n,), torch.float32)
    x = x.to(dtype)
    dy = torch.randn(shape).to(dtype)

    def run(norm_shape):
        leaves = [t.clone().requires_grad_(requires_grad) for t in (x, w, b)]
        outs = [normfuse.layer_norm(leaves[0], norm_shape, leaves[1], leaves[2]),
                normfuse.rms_norm(leaves[0], norm_shape, leaves[1])]  # fmt: skip
        if not requires_grad:
            return outs
        grads = [torch.autograd.grad(outs[0], leaves, dy), torch.autograd.grad(outs[1], leaves[:2], dy)]
        return [*outs, *grads[0], *grads[1]]

    general = run([n])  # a list shape takes the general path
    calls = _count_general_checks(monkeypatch)
    direct = run((n,))
    assert calls == []
    assert direct[0].dtype == dtype and direct[1].dtype == dtype
    for got, want in zip(direct, general):
        assert got.dtype == want.dtype and torch.equal(got, want)
    torch.testing.assert_close(direct[0].float(), F.layer_norm(x, (n,), w, b).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(8, 768), (2, 3, 5), (0, 16), (7, 1)])
@pytest.mark.parametrize("params", ["parameters", "tensors", "none"])
def test_direct_training_path_gives_the_general_path_s_bits(dtype, shape, params, monkeypatch):
    """Something requires grad: the direct path records the same autograd node the general path
    does (a list shape takes the general one), without the general checks: outputs and every
    gradient bit for bit."""
    n = shape[-1]
    x, w, b = _make(shape, (n,), dtype)
    if params == "none":
        w = b = None
    dy = torch.randn(shape).to(dtype)

    def run(norm_shape, which):
        leaves = [t.clone().requires_grad_(params != "tensors" or t is x) if t is not None else None for t in (x, w, b)]
        xl, wl, bl = leaves
        if params == "parameters" and wl is not None:
            wl, bl = torch.nn.Parameter(wl.detach()), torch.nn.Parameter(bl.detach())
        out = (normfuse.layer_norm(xl, norm_shape, wl, bl) if which == "ln"
               else normfuse.rms_norm(xl, norm_shape, wl))  # fmt: skip
        wanted = [t for t in (xl, wl, bl if which == "ln" else None) if t is not None and t.requires_grad]
        return [out, *torch.autograd.grad(out, wanted, dy)]

    for which in ("ln", "rms"):
        general = run([n], which)
        calls = _count_general_checks(monkeypatch)
        direct = run((n,), which)
        assert calls == [], which
        monkeypatch.undo()
        assert len(direct) == len(general)
        for got, want in zip(direct, general):
            assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), which


def test_direct_training_path_is_the_general_one_under_transforms():
    """Where the general path takes another route (torch.func, forward-mode AD), the direct
    training path declines, and the results are the general path's."""
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    w, b = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(lambda xi: normfuse.layer_norm(xi, (16,), w, b).square().sum()))(x)
    want = torch.stack([torch.func.grad(lambda xi: F.layer_norm(xi, (16,), w, b).square().sum())(xi) for xi in x])
    assert torch.allclose(per_sample, want, rtol=1e-10, atol=1e-10)
    tangent = torch.randn_like(x)
    _, jvp_nf = torch.func.jvp(lambda t: normfuse.layer_norm(t, (16,), w, b), (x,), (tangent,))
    _, jvp_torch = torch.func.jvp(lambda t: F.layer_norm(t, (16,), w, b), (x,), (tangent,))
    assert torch.allclose(jvp_nf, jvp_torch, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_calls_are_bitwise_identical(dtype):
    """Same inputs, fresh allocations (so different addresses and alignments) each time: the
    same bits. Guards against code whose rounding depends on where buffers happen to land
    (vectorized and scalar loop versions chosen by runtime overlap checks)."""
    for n in (5, 37, 1000):
        x = torch.randn(6, n).to(dtype)
        w = torch.randn(n).to(dtype)
        dy = torch.randn(6, n).to(dtype)
        first = _grads(normfuse.layer_norm, x, (n,), w, None, dy)
        for _ in range(30):
            padding = torch.empty(int(torch.randint(1, 64, ())))  # shifts where the next tensors land
            again = _grads(normfuse.layer_norm, x.clone(), (n,), w.clone(), None, dy.clone())
            del padding
            for a, b in zip(first, again):
                if a is not None:
                    assert torch.equal(a, b)


# --- autocast ------------------------------------------------------------------------------------


def _under_autocast(device, dtype, fn):
    with torch.autocast(device_type=device, dtype=dtype):
        return fn()


@pytest.mark.parametrize("dtype", sorted(LOW_PRECISION, key=str))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_gives_torchs_dtypes(x_dtype, dtype, device):
    # CUDA autocast runs torch's norms in float32 (inputs cast, float32 out); CPU autocast leaves
    # them alone: normfuse gives the dtype torch gives on each
    x = torch.randn(4, 3, 16, device=device).to(x_dtype)
    r = torch.randn(4, 3, 16, device=device).to(x_dtype)
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    pairs = [
        (lambda: F.layer_norm(x, (16,), w, b), lambda: normfuse.layer_norm(x, (16,), w, b)),
        (lambda: F.rms_norm(x, (16,), w), lambda: normfuse.rms_norm(x, (16,), w)),
        (lambda: F.layer_norm(x + r, (16,), w, b), lambda: normfuse.add_layer_norm(x, r, (16,), w, b)[0]),
        (lambda: F.rms_norm(x + r, (16,), w), lambda: normfuse.add_rms_norm(x, r, (16,), w)[0]),
        (lambda: torch.nn.LayerNorm(16, device=device)(x), lambda: normfuse.LayerNorm(16, device=device)(x)),
    ]
    for torch_fn, our_fn in pairs:
        want, got = _under_autocast(device, dtype, torch_fn), _under_autocast(device, dtype, our_fn)
        skip_where_older_torch_differs(got.dtype != want.dtype, f"gives {want.dtype} where normfuse gives {got.dtype}")
        assert got.dtype == want.dtype
        assert max_rel_err(got, want) <= 2 * FWD_TOL[got.dtype]


def test_autocast_float32_policy(monkeypatch):
    # The float32 policy on the CPU (whose autocast has none for norms), to test it without a GPU:
    # what CUDA autocast does, spelled out as explicit casts of the same inputs.
    from normfuse import functional

    monkeypatch.setitem(functional._AUTOCAST_FP32, "layer_norm", frozenset({"cpu"}))
    monkeypatch.setitem(functional._AUTOCAST_FP32, "rms_norm", frozenset({"cpu"}))
    x = torch.randn(6, 16).to(torch.bfloat16).requires_grad_()
    r = torch.randn(6, 16).to(torch.bfloat16)
    w = torch.randn(16).to(torch.float16).requires_grad_()  # mixed with bf16 x: fine once both are fp32
    b = torch.randn(16).to(torch.bfloat16)
    cases = [
        (lambda: normfuse.layer_norm(x, (16,), w, b), lambda: F.layer_norm(x.float(), (16,), w.float(), b.float())),
        (lambda: normfuse.rms_norm(x, (16,), w), lambda: F.rms_norm(x.float(), (16,), w.float())),
        (lambda: normfuse.add_layer_norm(x, r, (16,), w.float(), b)[0],
         lambda: F.layer_norm((x + r).float(), (16,), w.float(), b.float())),
        (lambda: normfuse.add_rms_norm(x, r, (16,), w, residual_dtype=torch.float32)[0],
         lambda: F.rms_norm(x.float() + r.float(), (16,), w.float())),
        # the model-family formulas keep their own casts
        (lambda: normfuse.rms_norm(x, (16,), w.float(), xhat_dtype=torch.bfloat16),
         lambda: w.float() * F.rms_norm(x.float(), (16,)).to(torch.bfloat16)),
    ]  # fmt: skip
    for ours, want_fn in cases:
        got = _under_autocast("cpu", torch.bfloat16, ours)
        want = want_fn()
        assert got.dtype == want.dtype
        assert max_rel_err(got, want) <= FWD_TOL[torch.float32]
        (gx, gw), (wx, ww) = (torch.autograd.grad(o.sum(), (x, w)) for o in (got, want))
        assert gx.dtype == wx.dtype == torch.bfloat16 and gw.dtype == ww.dtype == torch.float16
        assert norm_err(gx, wx) < 1e-2 and norm_err(gw, ww) < 1e-2  # gradients rounded to bf16/fp16
    # without autocast nothing changes
    assert normfuse.layer_norm(x, (16,), w.float(), b.float()).dtype == torch.bfloat16


# --- nested tensors ------------------------------------------------------------------------------


def _jagged(*lengths, rest=(4, 16), dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(sum(lengths))
    parts = [torch.randn(n, *rest, generator=g).to(dtype) for n in lengths]
    return torch.nested.nested_tensor(parts, layout=torch.jagged, requires_grad=requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalized_shape", [(16,), (4, 16)])
def test_jagged_nested_tensors_match_the_reference(normalized_shape, dtype):
    x = _jagged(3, 5, 1, dtype=dtype, requires_grad=True)
    w = torch.randn(normalized_shape).to(dtype).requires_grad_()
    b = torch.randn(normalized_shape).to(dtype)
    out = normfuse.layer_norm(x, normalized_shape, w, b)
    assert out.is_nested and out.shape == x.shape and out.dtype == dtype
    assert torch.equal(out.offsets(), x.offsets())
    ref = reference.layer_norm(x.values().detach(), normalized_shape, w.detach(), b)
    assert max_rel_err(out.values(), ref) <= FWD_TOL[dtype]
    dy = torch.randn(x.values().shape).to(dtype)
    dx, dw = torch.autograd.grad(out.values(), (x, w), dy)
    rdx, rdw, _ = reference.layer_norm_backward(dy, x.values().detach(), normalized_shape, w.detach())
    assert dx.is_nested and norm_err(dx.values(), rdx) <= 1e-2 and norm_err(dw, rdw) <= 1e-2
    rms = normfuse.rms_norm(x, normalized_shape, w)
    assert rms.is_nested and rms.dtype == dtype
    eps = torch.finfo(torch.float32).eps
    rref = reference.layer_norm(x.values().detach(), normalized_shape, w.detach(), None, eps, rms=True)
    assert max_rel_err(rms.values(), rref) <= FWD_TOL[dtype]
    # the module, and torch's nested result itself
    module = normfuse.LayerNorm(normalized_shape, dtype=dtype)
    twin = torch.nn.LayerNorm(normalized_shape, dtype=dtype)
    assert max_rel_err(module(x).values(), twin(x).values()) <= 2 * FWD_TOL[dtype]


def test_jagged_add_norm_keeps_the_ragged_structure():
    x = _jagged(2, 6, requires_grad=True)
    r = torch.nested.nested_tensor_from_jagged(torch.randn(x.values().shape), x.offsets(), jagged_dim=1)
    w = torch.randn(16)
    out, h = normfuse.add_rms_norm(x, r, (16,), w)
    assert out.is_nested and h.is_nested and out.shape == h.shape == x.shape
    assert torch.equal(h.values(), (x + r).values())
    assert max_rel_err(out.values(), F.rms_norm(h.values(), (16,), w)) <= 2 * FWD_TOL[torch.float32]
    out, h, mask = normfuse.add_layer_norm(x, r, (16,), dropout_p=0.5, return_dropout_mask=True)
    assert mask.is_nested and mask.dtype == torch.bool and mask.shape == x.shape
    (dx,) = torch.autograd.grad((out.values() + h.values()).sum(), x)
    assert dx.is_nested and torch.equal(dx.values() == 0, ~mask.values())  # dropped elements get no gradient
    with pytest.raises(RuntimeError, match="does not match x of shape"):
        normfuse.add_layer_norm(x, _jagged(3, 6), (16,))  # another ragged structure


def test_nested_tensor_errors_and_what_torch_computes():
    x = _jagged(3, 5)
    for shape in [(8,), (3, 4, 16)]:
        assert_same_error(lambda f, s=shape: f(x, s), F.layer_norm, normfuse.layer_norm)
        assert_same_error(lambda f, s=shape: f(x, s), F.rms_norm, normfuse.rms_norm)
    flat = torch.nested.nested_tensor([torch.randn(3), torch.randn(5)], layout=torch.jagged)
    assert_same_error(lambda f: f(flat, (1,)), F.layer_norm, normfuse.layer_norm)
    # a norm over the ragged dim has no kernel here: torch computes it, and normfuse says so once
    normfuse.functional._warned_nested.clear()
    with pytest.warns(RuntimeWarning, match="torch's own function computes it"):
        got = normfuse.layer_norm(x, x.shape[1:])
    assert torch.equal(got.values(), F.layer_norm(x, x.shape[1:]).values())


def test_inference_mode_gives_inference_tensors_and_refuses_them_to_autograd_as_torch():
    x = torch.randn(4, 8, 32)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    with torch.inference_mode():
        got, want = normfuse.layer_norm(x, (32,), w, b), F.layer_norm(x, (32,), w, b)
        x_inference = torch.randn(4, 32)
    assert got.is_inference() and want.is_inference() and got.grad_fn is None
    assert max_rel_err(got, want) <= FWD_TOL[torch.float32]
    # an inference tensor cannot be saved for a backward: torch's RuntimeError, in torch's words
    assert_same_error(lambda f: f(x_inference, (32,), w, b), F.layer_norm, normfuse.layer_norm)


def test_a_retained_graph_gives_the_same_gradients_twice():
    x = torch.randn(6, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    b = torch.randn(32, requires_grad=True)
    y = normfuse.layer_norm(x, (32,), w, b)
    first = torch.autograd.grad(y.square().sum(), [x, w, b], retain_graph=True)
    second = torch.autograd.grad(y.square().sum(), [x, w, b])
    assert all(torch.equal(g1, g2) for g1, g2 in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_input_gives_torchs_layout_values_and_gradients(dtype):
    x = torch.randn(2, 3, 5, 7).to(dtype=dtype, memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(7, dtype=dtype, requires_grad=True)
    got, want = normfuse.layer_norm(x, (7,), w), F.layer_norm(x, (7,), w)
    assert got.stride() == want.stride()
    assert max_rel_err(got, want) <= FWD_TOL[dtype]
    dy = torch.randn_like(got)
    for g, r in zip(torch.autograd.grad(got, (x, w), dy), torch.autograd.grad(want, (x, w), dy)):
        assert g.stride() == r.stride() and norm_err(g, r) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_compiled_with_dynamic_shapes_compiles_once_for_every_row_count():
    from torch._dynamo.testing import CompileCounter

    w, b = torch.randn(32), torch.randn(32)
    counter = CompileCounter()
    compiled = torch.compile(lambda t: normfuse.layer_norm(t, (32,), w, b), backend=counter, fullgraph=True, dynamic=True)
    for rows in (3, 5, 9, 17):
        t = torch.randn(rows, 32)
        assert max_rel_err(compiled(t), F.layer_norm(t, (32,), w, b)) <= FWD_TOL[torch.float32]
    assert counter.frame_count == 1
