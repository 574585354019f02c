"""A few fixed draws of ``benchmarks/fuzz_vs_torch.py``, so the script's judges keep working.

The script's long runs are not tests (their verdicts need reading); these seeds find nothing of
normfuse's, and a backward that regenerates the wrong dropout mask is caught by them.
"""

from __future__ import annotations

import importlib.util
import pathlib
import random
import warnings

import pytest
import torch

from tests._helpers import skip_where_older_torch_differs

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_vs_torch.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_vs_torch", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_core_cases_find_nothing(fuzz):
    rng = random.Random(3)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = {case.text: fuzz.check(case)[0] for case in (fuzz.Case(rng, i) for i in range(16))}
    found = {text: problems for text, problems in found.items() if problems}
    skip_where_older_torch_differs(bool(found), f"answers these draws otherwise: {found}")
    assert found == {}


def test_option_cases_find_nothing(fuzz):
    rng = random.Random(3)
    torch.manual_seed(3)
    found = {case.text: fuzz.check_extras(case) for case in (fuzz.ExtrasCase(rng, i) for i in range(16))}
    assert {text: problems for text, problems in found.items() if problems} == {}


def test_option_cases_catch_a_backward_with_another_dropout_mask(fuzz, monkeypatch):
    from normfuse import ops

    run_bwd = ops._run_bwd

    def wrong_seed(*args, **kwargs):
        args = list(args)
        args[9] = None if args[9] is None else args[9] + 1  # the seed: the mask of another draw
        return run_bwd(*args, **kwargs)

    monkeypatch.setattr(ops, "_run_bwd", wrong_seed)
    rng = random.Random(4)
    torch.manual_seed(4)
    cases = [case for case in (fuzz.ExtrasCase(rng, i) for i in range(200))
             if case.op in ("add_layer_norm", "add_rms_norm") and case.p > 0 and case.training and case.grad
             and case.x.numel() > 0 and case.p < 1][:3]  # fmt: skip
    assert len(cases) == 3
    assert all(fuzz.check_extras(case) for case in cases)


def test_cases_through_the_triton_kernels_find_nothing(fuzz):
    """The same judges over the Triton backend (the interpreter without a GPU, rounding bf16 as a
    GPU does: ``tests/conftest.py``)."""
    import normfuse
    from normfuse.backends import triton as triton_backend

    if not triton_backend.available():
        pytest.skip(f"the Triton kernels cannot run here; they need {triton_backend.WHERE_IT_RUNS}")
    rng = random.Random(5)
    torch.manual_seed(5)
    with normfuse.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = {case.text: fuzz.check(case)[0] for case in (fuzz.Case(rng, i) for i in range(5))}
        found.update({case.text: fuzz.check_extras(case) for case in (fuzz.ExtrasCase(rng, i) for i in range(5))})
    assert {text: problems for text, problems in found.items() if problems} == {}
