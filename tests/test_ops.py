"""The custom ops and the choice of backend."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import normfuse
from normfuse import ops, reference
from tests._helpers import FWD_TOL, max_rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rms", [False, True])
def test_opcheck_forward_and_backward(dtype, rms):
    x = torch.randn(6, 20, dtype=dtype, requires_grad=True)
    w = torch.randn(20, dtype=dtype, requires_grad=True)
    b = torch.randn(20, dtype=dtype, requires_grad=True)
    plain = (None, 0.0, None, False, None, None)
    torch.library.opcheck(torch.ops.normfuse.norm_fwd, (x, None, w, b, 1e-5, rms, *plain))
    torch.library.opcheck(torch.ops.normfuse.norm_fwd, (x, None, None, None, 1e-5, rms, *plain))
    out, _, mean, rstd, _ = torch.ops.normfuse.norm_fwd(x.detach(), None, w.detach(), b.detach(), 1e-5, rms, *plain)
    dy = torch.randn_like(out)
    for mask in [(True, True, True), (True, False, False), (False, True, False)]:
        args = (dy, None, x.detach(), w.detach(), mean, rstd, rms, False, 0.0, None, dtype, None, mask[0], False, *mask[1:])
        torch.library.opcheck(torch.ops.normfuse.norm_bwd, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck_residual_add(dtype, dropout_p):
    x = torch.randn(6, 20, dtype=dtype, requires_grad=True)
    r = torch.randn(6, 20, dtype=torch.float32, requires_grad=True)
    w = torch.randn(20, dtype=dtype, requires_grad=True)
    seed = torch.tensor(12345) if dropout_p else None
    args = (x, r, w, None, 1e-5, True, torch.float32, dropout_p, seed, True, None, None)
    torch.library.opcheck(torch.ops.normfuse.norm_fwd, args)
    out, h, mean, rstd, mask = torch.ops.normfuse.norm_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    assert h.dtype == torch.float32 and out.dtype == dtype and mask.dtype == torch.bool
    dy, dh = torch.randn_like(out), torch.randn_like(h)
    bwd = (dy, dh, h, w.detach(), mean, rstd, True, True, dropout_p, seed, dtype, torch.float32, True, True, True, False)
    torch.library.opcheck(torch.ops.normfuse.norm_bwd, bwd)


def test_cpu_is_chosen_for_cpu_tensors():
    assert ops.backend_name(torch.empty(2, 2)) == "cpu"
    assert ops.backend_name(torch.empty(2, 2, dtype=torch.bfloat16)) == "cpu"


def test_use_backend_forces_and_restores():
    x = torch.empty(2, 2)
    with normfuse.use_backend("reference"):
        assert ops.backend_name(x) == "reference"
        with normfuse.use_backend(None):
            assert ops.backend_name(x) == "cpu"
    assert ops.backend_name(x) == "cpu"
    with pytest.raises(ValueError, match="unknown normfuse backend"):
        with normfuse.use_backend("cuda-magic"):
            pass


def _backend_in_subprocess(env_value: str) -> subprocess.CompletedProcess:
    code = "import torch, normfuse.ops as o; print(o.backend_name(torch.empty(2)))"
    env = {**os.environ, "NORMFUSE_BACKEND": env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_forces():
    done = _backend_in_subprocess("reference")
    assert done.returncode == 0 and done.stdout.strip() == "reference", done.stderr
    done = _backend_in_subprocess("nonsense")
    assert done.returncode != 0 and "NORMFUSE_BACKEND='nonsense'" in done.stderr


def test_use_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setattr(ops, "_ENV_BACKEND", "reference")
    assert ops.backend_name(torch.empty(2)) == "reference"
    with normfuse.use_backend("cpu"):
        assert ops.backend_name(torch.empty(2)) == "cpu"


def test_forced_reference_backend_runs_and_agrees():
    x = torch.randn(5, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    with normfuse.use_backend("reference"):
        out = normfuse.layer_norm(x, (33,), w)
        out.sum().backward()
    ref = reference.layer_norm(x.detach(), (33,), w.detach())
    assert max_rel_err(out.detach(), ref) <= FWD_TOL[torch.float32]
    rdx, rdw, _ = reference.layer_norm_backward(torch.ones(5, 33), x.detach(), (33,), w.detach())
    assert max_rel_err(x.grad, rdx) < 1e-5 and max_rel_err(w.grad, rdw) < 1e-5


def test_unsupported_device_falls_back_to_reference_and_warns_once():
    ops._warned_fallbacks.clear()
    x = torch.empty(2, 3, device="meta")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.backend_name(x) == "reference"
        assert ops.backend_name(x) == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "reference" in messages[0]


def test_double_backward_goes_through_differentiable_formulas():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    out = normfuse.layer_norm(x, (9,), w)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    (ggw,) = torch.autograd.grad(gx.sum(), w)
    xr = x.detach().requires_grad_()
    wr = w.detach().requires_grad_()
    ref_out = torch.nn.functional.layer_norm(xr, (9,), wr)
    (rgx,) = torch.autograd.grad(ref_out.pow(2).sum(), xr, create_graph=True)
    (rggw,) = torch.autograd.grad(rgx.sum(), wr)
    assert torch.allclose(ggw, rggw, atol=1e-10)
