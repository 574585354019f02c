"""The Triton kernels: on a CUDA GPU when there is one, else in Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

import normfuse
from normfuse import reference
from tests._helpers import without_dres as _without_dres, FWD_TOL, max_rel_err, norm_err

triton_backend = pytest.importorskip("normfuse.backends.triton", reason="triton is not installed")
if not triton_backend.available():
    pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
WIDE = triton_backend.MAX_FUSED_N + 1000  # takes the looped (multi-block) kernels
MID = triton_backend.MAX_FUSED_N_BWD + 500  # fused forward, looped backward


def _inputs(rows, n, dtype, param_dtype=None, offset=0.5):
    param_dtype = param_dtype or dtype
    x = (torch.randn(rows, n, dtype=torch.float64) + offset).to(dtype).to(DEVICE)
    w = (1 + 0.3 * torch.randn(n, dtype=torch.float64)).to(param_dtype).to(DEVICE)
    b = (0.3 * torch.randn(n, dtype=torch.float64)).to(param_dtype).to(DEVICE)
    dy = torch.randn(rows, n, dtype=torch.float64).to(dtype).to(DEVICE)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 7), (19, 100), (64, 768), (2, MID), (3, WIDE)])
def test_kernels_match_reference(dtype, rms, rows, n):
    x, w, b, dy = _inputs(rows, n, dtype)
    out, _, mean, rstd, _ = triton_backend.norm_fwd(x, w, b, 1e-5, rms)
    assert out.dtype == dtype and mean.dtype == rstd.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = reference.layer_norm(x.cpu(), (n,), w.cpu(), b.cpu(), 1e-5, rms)
    assert max_rel_err(out.cpu(), ref) <= FWD_TOL[dtype]
    dx, _, dw, db = triton_backend.norm_bwd(dy, x, w, mean, rstd, rms, True, True, True)
    rdx, rdw, rdb = reference.layer_norm_backward(dy.cpu(), x.cpu(), (n,), w.cpu(), 1e-5, rms)
    if n > 1:
        assert norm_err(dx.cpu(), rdx) <= GRAD_TOL[dtype]
    acc_tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert norm_err(dw.cpu(), rdw) <= acc_tol
    if not rms:
        assert norm_err(db.cpu(), rdb) <= acc_tol


@pytest.mark.parametrize("n", [100, WIDE])
def test_gradient_flags_and_missing_parameters(n):
    x, w, _, dy = _inputs(9, n, torch.float32)
    out, _, mean, rstd, _ = triton_backend.norm_fwd(x, None, None, 1e-5, False)
    assert max_rel_err(out.cpu(), reference.layer_norm(x.cpu(), (n,))) <= FWD_TOL[torch.float32]
    full = _without_dres(triton_backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True))
    for mask in [(True, False, False), (False, True, False), (False, False, True)]:
        part = _without_dres(triton_backend.norm_bwd(dy, x, w, mean, rstd, False, *mask))
        for wanted, got, expected in zip(mask, part, full):
            assert (got is None) != wanted
            if wanted:
                # Each flag set is a differently compiled kernel; on a GPU the compiler may
                # contract a multiply-add differently in each, so agreement is to rounding.
                torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("n", [300, WIDE])
def test_deterministic(n):
    x, w, b, dy = _inputs(40, n, torch.bfloat16, param_dtype=torch.float32)
    runs = []
    for _ in range(2):
        out, _, mean, rstd, _ = triton_backend.norm_fwd(x, w, b, 1e-5, False)
        runs.append((out, *_without_dres(triton_backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("n", [1000, WIDE])
def test_large_mean_rows(n):
    """A mean of 1e4 in fp32: forward error as small as for centred rows, fused and looped."""
    x = (1e4 + torch.randn(4, n, dtype=torch.float64)).float().to(DEVICE)
    out, _, mean, rstd, _ = triton_backend.norm_fwd(x, None, None, 1e-5, False)
    assert max_rel_err(out.cpu(), reference.layer_norm(x.cpu(), (n,))) < 1e-3
    dy = torch.randn(4, n).to(DEVICE)
    dx, _, _, _ = triton_backend.norm_bwd(dy, x, None, mean, rstd, False, True, False, False)
    rdx, _, _ = reference.layer_norm_backward(dy.cpu(), x.cpu(), (n,))
    assert norm_err(dx.cpu(), rdx) < 1e-5


def test_nan_row_stays_in_its_row():
    x, w, b, _ = _inputs(4, 50, torch.float32)
    x[2, 7] = float("nan")
    out = triton_backend.norm_fwd(x, w, b, 1e-5, False)[0]
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


def test_through_the_front_end_with_autograd():
    x, w, b, dy = _inputs(6, 130, torch.float32)
    x.requires_grad_()
    w.requires_grad_()
    with normfuse.use_backend("triton"):
        out = normfuse.layer_norm(x, (130,), w, b)
        out.backward(dy)
        inference = normfuse.layer_norm(x.detach(), (130,), w.detach(), b)
    ref = reference.layer_norm(x.detach().cpu(), (130,), w.detach().cpu(), b.cpu())
    assert max_rel_err(out.detach().cpu(), ref) <= FWD_TOL[torch.float32]
    assert torch.equal(inference, out.detach())
    rdx, rdw, _ = reference.layer_norm_backward(dy.cpu(), x.detach().cpu(), (130,), w.detach().cpu())
    assert norm_err(x.grad.cpu(), rdx) < 2e-5 and norm_err(w.grad.cpu(), rdw) < 2e-5


@pytest.fixture
def big_chunks_in_interpreter():
    """The interpreter's cost is per loop step: walk wide rows in 64K chunks there (the same
    code path, fewer steps). On a GPU the tuned chunk sizes stay."""
    saved = dict(triton_backend.TUNING)
    if DEVICE == "cpu":
        triton_backend.TUNING.update(loop_block_n=65536, bwd_loop_block_n=65536)
        triton_backend.clear_config_caches()
    yield
    triton_backend.TUNING.update(saved)
    triton_backend.clear_config_caches()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_million_features(dtype, big_chunks_in_interpreter):
    """Rows of 2**20 features take the looped kernels instead of failing (no 64 KB cap)."""
    n = 1 << 20
    x, w, b, dy = _inputs(2, n, dtype)
    out, _, mean, rstd, _ = triton_backend.norm_fwd(x, w, b, 1e-5, False)
    assert max_rel_err(out.cpu(), reference.layer_norm(x.cpu(), (n,), w.cpu(), b.cpu())) <= FWD_TOL[dtype]
    dx, _, dw, db = triton_backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True)
    rdx, rdw, rdb = reference.layer_norm_backward(dy.cpu(), x.cpu(), (n,), w.cpu())
    assert norm_err(dx.cpu(), rdx) <= GRAD_TOL[dtype]
    assert norm_err(dw.cpu(), rdw) <= 2e-5 and norm_err(db.cpu(), rdb) <= 2e-5
