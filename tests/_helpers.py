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


# normfuse's contract is that of torch 2.13, the torch CI runs. An older torch of normfuse's range
# (torch>=2.5) answers a few of the tests' questions otherwise (README, "Older torch, Triton and
# transformers"): its rms_norm is a composite of elementwise ops (float32 out for a bf16 input
# with a float32 weight, eps=None the input dtype's epsilon, other shape errors), it raises
# RuntimeError where 2.13 raises NotImplementedError, its overflowing variance gives NaN. Where a
# test asks torch itself and such a torch answers otherwise, the test skips, saying what
# differed; on torch 2.13 and newer any difference fails.
OLDER_TORCH = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


def skip_where_older_torch_differs(differs: bool, what: str) -> None:
    """Skip the calling test where an older torch than 2.13 ``differs`` (``what`` says how)."""
    import pytest

    if differs and OLDER_TORCH:
        pytest.skip(f"torch {torch.__version__} {what}, where torch 2.13 and normfuse do not")


def assert_same_error(make, torch_fn, our_fn) -> None:
    """``make(fn)`` raises the same exception type with the same text for torch's fn and ours."""
    import pytest

    with pytest.raises(Exception) as torch_error:
        make(torch_fn)
    with pytest.raises(Exception) as our_error:
        make(our_fn)
    theirs, ours = torch_error.value, our_error.value
    differs = type(ours) is not type(theirs) or str(ours) != str(theirs)
    skip_where_older_torch_differs(differs, f"raises {type(theirs).__name__}: {theirs}")
    assert type(ours) is type(theirs)
    assert str(ours) == str(theirs)


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
