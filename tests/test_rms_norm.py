"""normfuse.rms_norm / RMSNorm against the float64 reference and torch's F.rms_norm / nn.RMSNorm."""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import normfuse
from normfuse import reference
from tests._helpers import assert_same_error, FWD_TOL, LOW_PRECISION, max_rel_err, norm_err, per_thread_count
from tests._helpers import skip_where_older_torch_differs

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _eps(dtype, eps=None):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps if eps is None else eps


def _grads(fn, x, shape, w, dy, **kwargs):
    xg = x.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_() if w is not None else None
    out = fn(xg, shape, wg, **kwargs)
    grads = torch.autograd.grad(out, [t for t in (xg, wg) if t is not None], dy)
    return out.detach(), grads[0], grads[1] if w is not None else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,normalized_shape", [((4, 32), (32,)), ((3, 5, 100), (100,)), ((2, 3, 4, 7), (4, 7))])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_reference_and_torch(dtype, shape, normalized_shape, affine, device):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(normalized_shape, dtype=torch.float64)).to(dtype).to(device) if affine else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    out, dx, dw = _grads(normfuse.rms_norm, x, normalized_shape, w, dy)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous() and out.device == x.device
    x, w, dy, out, dx, dw = (t.cpu() if t is not None else None for t in (x, w, dy, out, dx, dw))
    eps = _eps(dtype)
    ref = reference.layer_norm(x, normalized_shape, w, None, eps, rms=True)
    assert max_rel_err(out, ref) <= FWD_TOL[dtype]
    rdx, rdw, _ = reference.layer_norm_backward(dy, x, normalized_shape, w, eps, rms=True)
    assert dx.dtype == dtype and norm_err(dx, rdx) <= GRAD_TOL[dtype]
    if affine:
        assert dw.dtype == dtype and norm_err(dw, rdw) <= GRAD_TOL[dtype]
    tout, tdx, tdw = _grads(F.rms_norm, x, normalized_shape, w, dy)
    assert max_rel_err(out, tout) <= 2 * FWD_TOL[dtype]
    # no worse than torch (whose CPU rms_norm backward keeps low-precision intermediates)
    assert norm_err(dx, rdx) <= max(norm_err(tdx, rdx), GRAD_TOL[dtype] / 4) * 1.5


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_mixed_weight_dtypes_follow_torch(x_dtype, w_dtype):
    """torch computes every mix in the input's computation dtype and returns the input's dtype."""
    x = torch.randn(16, 48).to(x_dtype)
    w = (1 + 0.5 * torch.randn(48)).to(w_dtype)
    ours = normfuse.rms_norm(x, (48,), w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that it takes its unfused path for a mix
        theirs = F.rms_norm(x, (48,), w)
    skip_where_older_torch_differs(theirs.dtype != x_dtype, f"returns {theirs.dtype} for this mix")
    assert ours.dtype == theirs.dtype == x_dtype
    assert max_rel_err(ours, theirs) <= 2 * FWD_TOL[x_dtype]


def test_eps_none_is_the_computation_dtypes_epsilon():
    x = torch.full((2, 8), 1e-5)  # mean square 1e-10, below float32's epsilon
    for dtype in DTYPES:
        xd = x.to(dtype)
        ours, theirs = normfuse.rms_norm(xd, (8,)), F.rms_norm(xd, (8,))
        # the contract itself, whatever torch runs: float32's epsilon for the 16-bit dtypes
        eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        assert max_rel_err(ours, reference.layer_norm(xd, (8,), None, None, eps, rms=True)) <= FWD_TOL[dtype]
        skip_where_older_torch_differs(
            max_rel_err(ours, theirs) > 2 * FWD_TOL[dtype], f"takes eps=None as {dtype}'s own epsilon"
        )
        assert max_rel_err(ours, theirs) <= 2 * FWD_TOL[dtype]
    assert max_rel_err(normfuse.rms_norm(x, (8,), eps=1e-3), F.rms_norm(x, (8,), eps=1e-3)) <= 2 * FWD_TOL[torch.float32]
    for eps in (True, torch.tensor(1e-3), torch.tensor(1)):  # torch's parser takes these for a float
        assert max_rel_err(normfuse.rms_norm(x, (8,), eps=eps), F.rms_norm(x, (8,), eps=eps)) <= 2 * FWD_TOL[torch.float32]


@st.composite
def _cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    normalized_shape = tuple(draw(st.lists(st.integers(1, 70), min_size=1, max_size=2)))
    lead = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    affine = draw(st.booleans())
    transposed = draw(st.booleans())
    scale = draw(st.sampled_from([1.0, 1e-3, 1e4]))
    return dtype, normalized_shape, lead, affine, transposed, scale


@given(_cases())
def test_random_shapes_layouts_and_values(case):
    dtype, normalized_shape, lead, affine, transposed, scale = case
    shape = lead + normalized_shape
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    if transposed and x.dim() >= 2:
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous
        normalized_shape = tuple(x.shape[x.dim() - len(normalized_shape) :])
    w = (1 + 0.5 * torch.randn(normalized_shape, dtype=torch.float64)).to(dtype) if affine else None
    out = normfuse.rms_norm(x, normalized_shape, w)
    ref = reference.layer_norm(x, normalized_shape, w, None, _eps(dtype), rms=True)
    assert out.shape == x.shape and out.dtype == dtype
    assert max_rel_err(out, ref) <= FWD_TOL[dtype]


def test_zero_rows_single_feature_nan_inf_and_extreme_values():
    assert normfuse.rms_norm(torch.randn(0, 4), (4,)).shape == (0, 4)
    w = torch.ones(4, requires_grad=True)
    normfuse.rms_norm(torch.randn(0, 4), (4,), w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(4))
    one = torch.randn(5, 1)
    assert max_rel_err(normfuse.rms_norm(one, (1,)), F.rms_norm(one, (1,))) <= 2 * FWD_TOL[torch.float32]
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    ours, theirs = normfuse.rms_norm(x, (16,)), F.rms_norm(x, (16,))
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours[[0, 3]], ours[[0, 3]]) and max_rel_err(ours[[0, 3]], theirs[[0, 3]]) < 1e-6
    for value in (1e-30, 1e18, 1e30):  # x^2 underflows / overflows in float32 as in torch
        big = torch.randn(3, 16) * value
        ours, theirs = normfuse.rms_norm(big, (16,)), F.rms_norm(big, (16,))
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert max_rel_err(ours, theirs) <= 2 * FWD_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("add", ["none", "residual", "fp32 residual, dropout"])
def test_one_feature_dx_is_exact_not_a_rounding_residue(dtype, add):
    """Over one feature dx = g * (1 - xhat^2) * r, and 1 - xhat^2 = eps * r^2 exactly, which the
    general formula (torch's too) leaves as a residue of rounding (xhat is about +-1): normfuse
    computes g * eps * r^3, so dx is right to the dtype's rounding (torch's fp32 one was off by
    about 1e-3 here). Through add_rms_norm too; dgamma is a plain sum."""
    if add == "fp32 residual, dropout" and dtype not in LOW_PRECISION:
        pytest.skip("a float32 residual stream is for bf16/fp16 activations")
    gen = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((64, 1), (1,), (64, 1)))
    x, w, dy = x.to(dtype), w.to(dtype), dy.to(dtype)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    xl = x.clone().requires_grad_()
    if add == "none":
        h = x.double()
        (dx,) = torch.autograd.grad(normfuse.rms_norm(xl, (1,), w, eps), [xl], dy)
        dh_arrived = 0.0
    else:
        r_dtype = torch.float32 if add.startswith("fp32") else dtype
        r = torch.randn(64, 1, generator=gen, dtype=torch.float64).to(r_dtype)
        p = 0.5 if "dropout" in add else 0.0
        rl, dres_out = r.clone().requires_grad_(), torch.randn(64, 1, generator=gen, dtype=torch.float64).to(r_dtype)
        out, h_out, keep = normfuse.add_rms_norm(xl, rl, (1,), w, eps, dropout_p=p, return_dropout_mask=True)
        dx, dres = torch.autograd.grad([out, h_out], [xl, rl], [dy, dres_out])
        h, dh_arrived = h_out.double(), dres_out.double()
    dh = dy.double() * w.double() * eps * (h.square() + eps) ** -1.5 + dh_arrived
    tol = 1e-12 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
    if add == "none":
        assert norm_err(dx, dh) <= tol
    else:
        assert norm_err(dres, dh) <= tol
        want_dx = dh * keep.double() / (1 - p) if p else dh
        assert norm_err(dx, want_dx) <= tol
    # non-finite inputs as the general form (and torch) give them: NaN for NaN and for Inf
    big = torch.finfo(dtype).max  # finite, its square past float32's range for bf16 and float32
    special = torch.tensor([[float("inf")], [float("-inf")], [float("nan")], [0.0], [big]], dtype=dtype)
    sl = special.clone().requires_grad_()
    (got,) = torch.autograd.grad(normfuse.rms_norm(sl, (1,), None, eps), [sl], torch.ones_like(special))
    assert got[:3].isnan().all() and got[3:].isfinite().all()
    # double backward, in float64: the one-feature form differentiates as the general one does
    if dtype == torch.float64:
        wl = w.clone().requires_grad_()
        assert torch.autograd.gradgradcheck(lambda a, b: normfuse.rms_norm(a, (1,), b, 1e-3), (x.clone().requires_grad_(), wl))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_dweight_accumulates_in_fp32(dtype):
    x = torch.randn(8192, 64).to(dtype)
    w = torch.ones(64, dtype=dtype)
    dy = torch.randn(8192, 64).to(dtype)
    _, _, dw = _grads(normfuse.rms_norm, x, (64,), w, dy)
    _, rdw, _ = reference.layer_norm_backward(dy, x, (64,), w, _eps(dtype), rms=True)
    assert norm_err(dw, rdw) <= 4e-3  # a few bf16/fp16 roundings of the result, nothing more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dweight_bitwise_identical_across_thread_counts(dtype):
    x = torch.randn(4096, 96).to(dtype)
    dy = torch.randn(4096, 96).to(dtype)
    w = torch.randn(96).to(dtype)
    most = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    results = per_thread_count(lambda: _grads(normfuse.rms_norm, x, (96,), w, dy)[2], sorted({1, most}))
    assert all(torch.equal(results[0], r) for r in results)


@pytest.mark.parametrize("shape,normalized_shape,affine", [((3, 7), (7,), True), ((2, 3, 4), (3, 4), False), ((5, 1), (1,), True)])
def test_gradcheck_and_gradgradcheck(shape, normalized_shape, affine, device):
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(normalized_shape, dtype=torch.float64, device=device, requires_grad=True) if affine else None
    inputs = (x, w) if affine else (x,)

    def fn(*args):
        return normfuse.rms_norm(args[0], normalized_shape, args[1] if affine else None, eps=1e-6)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_inputs_are_never_modified():
    x, w = torch.randn(4, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    x0, w0 = x.detach().clone(), w.detach().clone()
    normfuse.rms_norm(x, (16,), w).sum().backward()
    assert torch.equal(x.detach(), x0) and torch.equal(w.detach(), w0)


# --- errors and PyTorch's own OpInfo samples ----------------------------------------------------

_x = torch.randn(3, 5)
ERROR_CASES = {
    "trailing shape": lambda f: f(_x, (4,)),
    "too few dims": lambda f: f(torch.randn(5), (3, 5)),
    "scalar input": lambda f: f(torch.tensor(1.0), (1,)),
    "scalar input, wrong weight": lambda f: f(torch.tensor(1.0), (1,), torch.ones(2)),
    "empty normalized_shape": lambda f: f(_x, ()),
    "weight shape": lambda f: f(_x, (5,), torch.ones(4)),
    "weight and input shape": lambda f: f(_x, (4,), torch.ones(3)),
    "long input": lambda f: f(_x.long(), (5,)),
    "bool input": lambda f: f(_x.bool(), (5,)),
    "int input wrong shape": lambda f: f(_x.int(), (4,)),
    "normalized_shape int": lambda f: f(_x, 5),
    "normalized_shape float element": lambda f: f(_x, (5.0,)),
    "weight not a tensor": lambda f: f(_x, (5,), 3),
    "eps a string": lambda f: f(_x, (5,), None, "a"),
    "input a numpy array": lambda f: f(np.ones((3, 5)), (5,)),
    "input None": lambda f: f(None, (5,)),
    "input a list": lambda f: f([[1.0] * 5], (5,)),
    "eps a 1-element 1-dim tensor": lambda f: f(_x, (5,), None, torch.tensor([0.1])),
    "eps a tensor that requires grad": lambda f: f(_x, (5,), None, torch.tensor(0.1, requires_grad=True)),
    "weight on another device": lambda f: f(_x, (5,), torch.ones(5, device="meta")),
    "int input, weight on another device": lambda f: f(_x.long(), (5,), torch.ones(5, device="meta")),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_match_torch(case):
    assert_same_error(ERROR_CASES[case], F.rms_norm, normfuse.rms_norm)


def _opinfo():
    from torch.testing._internal.common_methods_invocations import op_db

    return next(op for op in op_db if op.name == "nn.functional.rms_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_pytorch_opinfo_samples(dtype):
    op = _opinfo()
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=dtype != torch.bfloat16))
    assert samples
    for sample in samples:
        args, kwargs = sample.args, sample.kwargs
        theirs = F.rms_norm(sample.input, *args, **kwargs)
        ours = normfuse.rms_norm(sample.input, *args, **kwargs)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        assert max_rel_err(ours.detach(), theirs.detach()) <= 2 * FWD_TOL[dtype], sample


def test_pytorch_opinfo_error_inputs():
    op = _opinfo()
    errors = list(op.error_inputs("cpu"))
    assert errors
    for error in errors:
        sample = error.sample_input
        with pytest.raises(error.error_type, match=error.error_regex):
            normfuse.rms_norm(sample.input, *sample.args, **sample.kwargs)


# --- the module ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"eps": 1e-3}, {"elementwise_affine": False}])
def test_module_state_repr_and_state_dict_match_torch(kwargs):
    ours, theirs = normfuse.RMSNorm((3, 4), **kwargs), torch.nn.RMSNorm((3, 4), **kwargs)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert isinstance(ours, torch.nn.RMSNorm)
    if ours.weight is not None:
        theirs.weight.data.normal_()
        ours.load_state_dict(theirs.state_dict())
        assert torch.equal(ours.weight, theirs.weight)
        ours.weight.data.normal_()
        theirs.load_state_dict(ours.state_dict())
        assert torch.equal(ours.weight, theirs.weight)
    x = torch.randn(2, 3, 4)
    assert max_rel_err(ours(x), theirs(x)) <= 2 * FWD_TOL[torch.float32]
    ours.weight is None or ours.reset_parameters()
    assert ours.weight is None or torch.equal(ours.weight, torch.ones(3, 4))


def test_module_from_torch_shares_parameters():
    theirs = torch.nn.RMSNorm(8, eps=1e-4, dtype=torch.float64)
    ours = normfuse.RMSNorm.from_torch(theirs)
    assert ours.weight is theirs.weight and ours.eps == 1e-4 and ours.weight.dtype == torch.float64
    with pytest.raises(TypeError, match="expects a torch.nn.RMSNorm"):
        normfuse.RMSNorm.from_torch(torch.nn.LayerNorm(8))


def test_complex_input_is_computed_by_torch():
    x = torch.randn(3, 5, dtype=torch.complex64)
    assert torch.equal(normfuse.rms_norm(x, (5,)), F.rms_norm(x, (5,)))
