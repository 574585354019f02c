"""The Triton kernels: on a CUDA GPU when there is one, else in Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

import normfuse
from normfuse import reference
from tests._helpers import FWD_TOL, max_rel_err, norm_err
from tests._helpers import without_dres as _without_dres

triton_backend = pytest.importorskip("normfuse.backends.triton", reason="triton is not installed")
if not triton_backend.available():
    pytest.skip(f"the Triton kernels cannot run here; they need {triton_backend.WHERE_IT_RUNS}",
                allow_module_level=True)  # fmt: skip

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# the split backward, and the looped forward for 2- and 8-byte elements (4-byte ones stay in
# registers up to MAX_FUSED_N_FP32; test_million_features takes fp32 through the looped forward)
WIDE = triton_backend.MAX_FUSED_N + 1000
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [33, WIDE])
def test_finite_rows_whose_squares_overflow_give_the_bias(dtype, n):
    """A finite row whose centred squares overflow float32 (1e30 among N(0, 1)): rstd 0 and
    every output the bias, as torch gives. The fused forward's c * c overflowed with the squares'
    sum; inf - inf clamped to 0 scaled the row by 1 / sqrt(eps), outputs of 3e32."""
    torch.manual_seed(5)
    x, w, b, dy = _inputs(3, n, dtype)
    x[1, 5], x[2, n - 3] = 1e30, -1e30
    out, _, mean, rstd, _ = triton_backend.norm_fwd(x, w, b, 1e-5, False)
    assert torch.equal(rstd[1:].cpu(), torch.zeros(2)) and torch.equal(out[1:].cpu(), b.cpu().expand(2, n))
    assert max_rel_err(out[0].cpu(), reference.layer_norm(x[:1].cpu(), (n,), w.cpu(), b.cpu())[0]) <= FWD_TOL[dtype]
    dx, _, _, _ = triton_backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True)
    assert torch.equal(dx[1:].cpu(), torch.zeros(2, n, dtype=dtype))


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



def test_torch_func_transforms_through_the_front_end():
    # vmap folds into one kernel call; jvp and per-sample gradients (vmap of grad) as on the CPU
    x, w, b, _ = _inputs(12, 130, torch.float32)
    x = x.view(4, 3, 130)
    with normfuse.use_backend("triton"):
        got = torch.func.vmap(lambda t: normfuse.layer_norm(t, (130,), w, b))(x)
        _, tangent = torch.func.jvp(lambda t: normfuse.rms_norm(t, (130,), w), (x,), (x.cos(),))
        per_sample = torch.func.vmap(torch.func.grad(lambda t: normfuse.layer_norm(t, (130,), w, b).pow(2).sum()))(x)
    x64, w64, b64 = (t.cpu().double() for t in (x, w, b))
    assert max_rel_err(got.cpu(), reference.layer_norm(x64, (130,), w64, b64)) <= FWD_TOL[torch.float32]
    eps = torch.finfo(torch.float32).eps
    _, want = torch.func.jvp(lambda t: reference.layer_norm(t, (130,), w64, None, eps, rms=True), (x64,), (x64.cos(),))
    assert norm_err(tangent.cpu(), want) < 2e-5
    want = torch.func.vmap(torch.func.grad(lambda t: reference.layer_norm(t, (130,), w64, b64).pow(2).sum()))(x64)
    assert norm_err(per_sample.cpu(), want) < 2e-5

@pytest.mark.parametrize(
    "dtype,n,kernel",
    [(torch.float32, WIDE, "_fwd_rows"), (torch.bfloat16, WIDE, "_fwd_looped"), (torch.float64, WIDE, "_fwd_looped"),
     (torch.float32, triton_backend.MAX_FUSED_N_FP32 + 1, "_fwd_looped"),
     (torch.bfloat16, triton_backend.MAX_FUSED_N, "_fwd_rows")],
)  # fmt: skip
def test_forward_holds_rows_of_4_byte_elements_up_to_32768_features(dtype, n, kernel):
    """The forward's choice between the row in registers and the looped kernel, by element size."""
    launch, _ = triton_backend._fwd_plan(n, True, True, False, True, False, False, False, False, None, dtype)
    assert launch.kernel is getattr(triton_backend, kernel)


def _triton_fp32_to_bf16(t: torch.Tensor) -> torch.Tensor:
    """Triton's own fp32 -> bf16 conversion: round to nearest even on a GPU (torch's rule), and in
    the interpreter once the suite has made it round so (``interpreter_rounds_bf16_like_gpus``);
    an interpreter it could not patch truncates (drops the low 16 bits), so there those bits."""
    if DEVICE == "cuda" or triton_backend.interpreter_rounds_bf16_like_gpus():
        return t.to(torch.bfloat16)
    return (t.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def test_parameter_gradients_rounded_once_by_the_partial_sums():
    """_sum_partials adds in fp32 and rounds on its store: the bits of converting the fp32 sums once."""
    x, w, _, dy = _inputs(40, 300, torch.bfloat16)
    _, _, mean, rstd, _ = triton_backend.norm_fwd(x, w, None, 1e-5, False)
    _, _, dw, db = triton_backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True)
    _, _, dw16, db16 = triton_backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True,
                                               dweight_dtype=torch.bfloat16, dbias_dtype=torch.bfloat16)  # fmt: skip
    assert dw.dtype == torch.float32 and dw16.dtype == db16.dtype == torch.bfloat16
    assert torch.equal(dw16, _triton_fp32_to_bf16(dw)) and torch.equal(db16, _triton_fp32_to_bf16(db))


@pytest.fixture
def big_chunks_in_interpreter():
    """The interpreter's cost is per loop step: walk wide rows in 64K chunks there (the same
    code path, fewer steps). On a GPU the tuned chunk sizes stay."""
    saved = dict(triton_backend.TUNING)
    if DEVICE == "cpu":
        triton_backend.TUNING.update(loop_block_n=65536, bwd_loop_block_n=65536, sums_block_n=65536, split_block_n=65536)
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


# --- the residual-add, dropout and x-hat rounding flags --------------------------------------------


@pytest.fixture
def wide_backward_modes():
    """Switches TUNING["bwd_wide"] for a test and restores the settings after it."""
    saved = dict(triton_backend.TUNING)

    def use(mode):
        triton_backend.TUNING["bwd_wide"] = mode
        triton_backend.clear_config_caches()

    yield use
    triton_backend.TUNING.update(saved)
    triton_backend.clear_config_caches()


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("n", [MID, WIDE])
def test_wide_backward_split_and_looped_both_match_reference(rms, n, wide_backward_modes):
    """Rows wider than MAX_FUSED_N_BWD: the split kernels (row sums, then a grid of column
    blocks) and the looped one give the reference's gradients through a residual add with
    dropout, the same dropout mask, and the same bits on a second run."""
    x, w, b, dy = _inputs(6, n, torch.float32)
    r = torch.randn(6, n, dtype=torch.float64).to(torch.float32).to(DEVICE)
    dh_out = torch.randn(6, n, dtype=torch.float64).to(torch.float32).to(DEVICE)
    kw = dict(add=True, dresidual_out=dh_out, need_dresidual=True, x_dtype=torch.float32,
              residual_dtype=torch.float32, dropout_p=0.3, seed=7)  # fmt: skip
    _, h, mean, rstd, _ = triton_backend.norm_fwd(
        x, w, b, 1e-5, rms, residual=r, residual_out_dtype=torch.float32, dropout_p=0.3, seed=7
    )
    expected = reference.norm_bwd(dy.cpu(), h.cpu(), w.cpu(), mean.cpu(), rstd.cpu(), rms, True, True, True,
                                  **dict(kw, dresidual_out=dh_out.cpu()))  # fmt: skip
    results = {}
    for mode in ("split", "looped"):
        wide_backward_modes(mode)
        results[mode] = triton_backend.norm_bwd(dy, h, w, mean, rstd, rms, True, True, True, **kw)
        again = triton_backend.norm_bwd(dy, h, w, mean, rstd, rms, True, True, True, **kw)
        assert all(torch.equal(a, b) for a, b in zip(results[mode], again))
        for got, want in zip(results[mode], expected):
            assert norm_err(got.cpu(), want) <= 2e-5
    assert torch.equal(results["split"][0] == 0, results["looped"][0] == 0)


@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("n", [100, MID, WIDE])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_residual_add_and_dropout_match_reference(x_dtype, res_dtype, rms, n, dropout_p):
    """The same hash as every backend: masks, residual outputs and gradients equal the reference's."""
    rows = 3 if n > 1000 else 9
    x, w, b, dy = _inputs(rows, n, x_dtype)
    residual = torch.randn(rows, n, dtype=torch.float64).to(res_dtype).to(DEVICE)
    kwargs = dict(residual=residual, residual_out_dtype=res_dtype, dropout_p=dropout_p, seed=2**40 + 12345, return_mask=True)
    out, h, mean, rstd, mask = triton_backend.norm_fwd(x, w, None if rms else b, 1e-5, rms, **kwargs)
    r_out, r_h, _, r_rstd, r_mask = reference.norm_fwd(x.cpu(), w.cpu(), None if rms else b.cpu(), 1e-5, rms, **{
        **kwargs, "residual": residual.cpu()})  # fmt: skip
    assert torch.equal(mask.cpu(), r_mask)
    # the kernels scale and add in the accumulation dtype, the reference in float64: one ulp
    assert max_rel_err(h.cpu(), r_h) <= FWD_TOL[res_dtype]
    assert out.dtype == x_dtype and h.dtype == res_dtype
    ref = reference.layer_norm(r_h, (n,), w.cpu(), None if rms else b.cpu(), 1e-5, rms)
    assert max_rel_err(out.cpu(), ref) <= FWD_TOL[x_dtype]
    dh_out = torch.randn(rows, n, dtype=torch.float64).to(res_dtype).to(DEVICE)
    bwd = dict(add=True, dresidual_out=dh_out, need_dresidual=True, x_dtype=x_dtype, residual_dtype=res_dtype,
               dropout_p=dropout_p, seed=2**40 + 12345)  # fmt: skip
    dx, dres, dw, _ = triton_backend.norm_bwd(dy, h, w, mean, rstd, rms, True, True, False, **bwd)
    rdx, rdres, rdw, _ = reference.norm_bwd(dy.cpu(), r_h, w.cpu(), mean.cpu(), r_rstd, rms, True, True, False, **{
        **bwd, "dresidual_out": dh_out.cpu()})  # fmt: skip
    assert dx.dtype == x_dtype and dres.dtype == res_dtype
    assert norm_err(dres.cpu(), rdres) <= GRAD_TOL[res_dtype] and norm_err(dx.cpu(), rdx) <= GRAD_TOL[x_dtype]
    assert not dx.cpu()[~r_mask].any()
    assert norm_err(dw.cpu(), rdw) <= 2e-5


@pytest.mark.parametrize("n", [100, WIDE])
def test_bf16_residual_sum_and_output_round_to_nearest_even_as_the_cpu_kernels(n):
    """bf16 stores round to nearest even (a GPU's cast; the interpreter's once the suite patched
    it): the residual sum bit for bit torch's ``x + r``, the output the CPU kernel's, on rows far
    from zero where truncation would move the sum by a whole step of 64."""
    if DEVICE == "cpu" and not triton_backend.interpreter_rounds_bf16_like_gpus():
        pytest.skip("this Triton's interpreter truncates fp32 to bf16 and could not be made to round")
    x = (torch.randn(4, n, dtype=torch.float64) * 10 + 1e4).to(torch.bfloat16).to(DEVICE)
    residual = torch.randn(4, n, dtype=torch.float64).to(torch.bfloat16).to(DEVICE)
    out, h, _, _, _ = triton_backend.norm_fwd(x, None, None, 0.5, False, residual=residual,
                                              residual_out_dtype=torch.bfloat16)  # fmt: skip
    assert torch.equal(h, x + residual)
    with normfuse.use_backend("cpu"):
        cpu_out, cpu_h = normfuse.add_layer_norm(x.cpu(), residual.cpu(), (n,), eps=0.5)
    assert torch.equal(h.cpu(), cpu_h)
    assert max_rel_err(out.cpu(), cpu_out) <= FWD_TOL[torch.bfloat16]


@pytest.mark.parametrize("xhat_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_xhat_rounding_matches_the_cpu_kernels(xhat_dtype, out_dtype):
    x, w, _, _ = _inputs(8, 300, torch.bfloat16)
    w32 = w.float() if out_dtype == torch.float32 else w
    got = triton_backend.norm_fwd(x, w32, None, 1e-6, True, xhat_dtype=xhat_dtype, out_dtype=out_dtype)[0]
    want = reference.norm_fwd(x.cpu(), w32.cpu(), None, 1e-6, True, xhat_dtype=xhat_dtype, out_dtype=out_dtype)[0]
    assert got.dtype == out_dtype
    # x-hat is rounded to bf16 first: results are products of two bf16 values, off by at most
    # one bf16 rounding of x-hat where the float32 statistics differ in their last bit
    assert max_rel_err(got.cpu(), want) <= FWD_TOL[torch.bfloat16]


def test_add_rms_norm_through_the_front_end():
    x, w, _, dy = _inputs(6, 130, torch.bfloat16)
    r = torch.randn(6, 130).to(DEVICE)
    x.requires_grad_()
    r.requires_grad_()
    with normfuse.use_backend("triton"):
        torch.manual_seed(5)
        out, h, mask = normfuse.add_rms_norm(x, r, (130,), w, dropout_p=0.2, return_dropout_mask=True)
        dx, dr = torch.autograd.grad((out, h), (x, r), (dy, torch.ones_like(h)))
    with normfuse.use_backend("cpu"):
        torch.manual_seed(5)
        cpu_out, cpu_h, cpu_mask = normfuse.add_rms_norm(
            x.detach().cpu(), r.detach().cpu(), (130,), w.cpu(), dropout_p=0.2, return_dropout_mask=True
        )
    assert torch.equal(mask.cpu(), cpu_mask) and torch.equal(h.detach().cpu(), cpu_h)
    assert max_rel_err(out.detach().cpu(), cpu_out) <= FWD_TOL[torch.bfloat16]
    assert dx.dtype == torch.bfloat16 and dr.dtype == torch.float32 and not dx.cpu()[~cpu_mask].any()


class _FakeCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("relaunch", grid, args))


class _FakeKernel:
    """Stands in for a JITFunction: records launches, returns a 'compiled kernel'."""

    arg_names = ["X", "n", "eps", "A", "B"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, **consts):
            self.calls.append(("jit", grid, args, num_warps, consts))
            return _FakeCompiled(self.calls)

        return launch


def test_launcher_relaunches_only_the_same_specialization():
    kernel = _FakeKernel()
    launch = triton_backend._Launcher(kernel, 4, B=2, A=1)  # declared order: A, B
    storage = torch.zeros(64)
    aligned, misaligned = storage[:8], storage[1:9]  # 4 bytes off a 16-byte boundary
    launch((3,), aligned, 10, 1e-5)
    launch((5,), aligned, 10, 1e-5)
    launch((5,), misaligned, 10, 1e-5)  # Triton specializes pointers on 16-byte alignment
    launch((5,), aligned, 11, 1e-5)  # and integers on their value
    launch((5,), aligned, 10, 1e-5, cacheable=False)
    kinds = [call[0] for call in kernel.calls]
    assert kinds == ["jit", "relaunch", "jit", "jit", "jit"]
    relaunch = kernel.calls[1]
    assert relaunch[1] == (5, 1, 1) and relaunch[2] == (aligned, 10, 1e-5, 1, 2)  # constexprs last, in order
    assert kernel.calls[0][3:] == (4, {"B": 2, "A": 1})


def test_argument_keys_tell_apart_what_triton_specializes_on():
    key = triton_backend._arg_key
    t = torch.zeros(16)
    assert key((1,)) != key((1.0,)) != key((True,))
    assert key((t[:4],)) == key((t[4:8],))  # both 16-byte aligned
    assert key((t[:4],)) != key((t[1:5],))
    assert key((t,)) != key((t.to(torch.float64),))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU: the interpreter returns no compiled kernel to relaunch")
@pytest.mark.parametrize("n", [768, MID])
def test_relaunched_kernels_match_triton_launches(n, monkeypatch):
    dtype = torch.bfloat16
    x, w, b, dy = _inputs(33, n, dtype)
    storage = torch.empty(x.numel() + 1, dtype=dtype, device=DEVICE)
    shifted = storage[1:].view(x.shape)  # 2 bytes off alignment: another specialization
    shifted.copy_(x)

    def fwd_bwd(inp):
        out, _, mean, rstd, _ = triton_backend.norm_fwd(inp, w, b, 1e-5, False)
        return (out,) + _without_dres(triton_backend.norm_bwd(dy, inp, w, mean, rstd, False, True, True, True))

    monkeypatch.setattr(triton_backend, "FAST_LAUNCH", False)
    expected = fwd_bwd(x)
    monkeypatch.setattr(triton_backend, "FAST_LAUNCH", True)
    triton_backend.clear_config_caches()
    for inp in (x, x, shifted, shifted, x):  # misses, then hits, for each alignment
        for got, want in zip(fwd_bwd(inp), expected):
            assert torch.equal(got, want)
    fwd_launch, _ = triton_backend._fwd_plan(n, True, True, False, True, False, False, False, False, None, dtype)
    assert len(fwd_launch.compiled) == 2  # one compiled kernel per alignment, relaunched after


@pytest.mark.parametrize("dtype,n", [(torch.bfloat16, 300), (torch.float16, 300), (torch.bfloat16, WIDE)])
def test_rstd_rounding_matches_the_cpu_kernels(dtype, n, big_chunks_in_interpreter):
    """DeepSeek-V4's unweighted norm (rstd rounded to x's dtype), in the row kernel and the
    looped one: x times a 16-bit rstd is exact in float32, so both backends round the same
    product once."""
    if DEVICE == "cpu" and dtype == torch.bfloat16 and not triton_backend.interpreter_rounds_bf16_like_gpus():
        pytest.skip("this Triton's interpreter truncates fp32 to bf16 and could not be made to round")
    x = (torch.randn(4, n, dtype=torch.float64) * 3).to(dtype).to(DEVICE)
    got, _, _, rstd, _ = triton_backend.norm_fwd(x, None, None, 1e-6, True, rstd_dtype=dtype)
    with normfuse.use_backend("cpu"):
        want = normfuse.rms_norm(x.cpu(), (n,), None, 1e-6, rstd_dtype=dtype)
    assert torch.equal(got.cpu(), want)
    # the saved rstd is not rounded: the backward's statistics
    plain_rstd = triton_backend.norm_fwd(x, None, None, 1e-6, True)[3]
    assert torch.equal(rstd, plain_rstd)
