"""Shared comparisons: every result is judged against the float64 reference."""

from __future__ import annotations

import torch

# Bound on |result - reference| / (1 + |reference|) for outputs of magnitude about 1, per
# storage dtype: a few units in the last place of the dtype (fp32 math for low precision).
FWD_TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
LOW_PRECISION = (torch.bfloat16, torch.float16)


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / (1 + |want|), NaN positions required to agree."""
    got64, want64 = got.to(torch.float64), want.to(torch.float64)
    assert torch.equal(got64.isnan(), want64.isnan()), "NaN positions differ"
    finite = ~want64.isnan()
    if not finite.any():
        return 0.0
    return ((got64 - want64).abs() / (1 + want64.abs()))[finite].max().item()


def norm_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (0 when both are zero)."""
    got64, want64 = got.to(torch.float64), want.to(torch.float64)
    denom = want64.norm().item()
    diff = (got64 - want64).norm().item()
    return diff / denom if denom > 0 else diff


def without_dres(grads: tuple) -> tuple:
    """(dx, dweight, dbias) of a backend's (dx, dresidual, dweight, dbias), for plain-norm tests."""
    dx, dres, dw, db = grads
    assert dres is None
    return dx, dw, db


def assert_same_error(make, torch_fn, our_fn) -> None:
    """``make(fn)`` raises the same exception type with the same text for torch's fn and ours."""
    import pytest

    with pytest.raises(Exception) as torch_error:
        make(torch_fn)
    with pytest.raises(Exception) as our_error:
        make(our_fn)
    assert type(our_error.value) is type(torch_error.value)
    assert str(our_error.value) == str(torch_error.value)


def per_thread_count(fn, counts) -> list:
    """``fn()`` once per thread count, set as users set it (``torch.set_num_threads``, which the
    CPU kernels follow), restored afterwards. A count of 1 keeps the kernels off numba's pool."""
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            results.append(fn())
    finally:
        torch.set_num_threads(previous)
    return results
