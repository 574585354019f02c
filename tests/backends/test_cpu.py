"""The numba kernels directly, on the 2-D backend contract, LayerNorm and RMSNorm flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normfuse
from normfuse import reference
from normfuse.backends import cpu
from tests._helpers import FWD_TOL, max_rel_err, norm_err, per_thread_count, skip_where_older_torch_differs
from tests._helpers import without_dres as _without_dres

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("rows,n", [(1, 7), (37, 130), (700, 64), (64, 5000)])
def test_kernels_match_reference(dtype, rms, rows, n):
    x = (torch.randn(rows, n, dtype=torch.float64) + 0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(n, dtype=torch.float64)).to(dtype)
    b = (0.3 * torch.randn(n, dtype=torch.float64)).to(dtype)
    dy = torch.randn(rows, n, dtype=torch.float64).to(dtype)
    out, _, mean, rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, rms)
    ref_out, _, ref_mean, ref_rstd, _ = reference.norm_fwd(x, w, b, 1e-5, rms)
    assert mean.dtype == rstd.dtype == _acc(dtype)
    assert max_rel_err(out, reference.layer_norm(x, (n,), w, b, 1e-5, rms)) <= FWD_TOL[dtype]
    assert max_rel_err(rstd, ref_rstd) < (1e-12 if dtype == torch.float64 else 1e-5)
    if rms:
        assert torch.equal(mean, torch.zeros_like(mean))
    dx, _, dw, db = cpu.norm_bwd(dy, x, w, mean, rstd, rms, True, True, True)
    rdx, rdw, rdb = reference.layer_norm_backward(dy, x, (n,), w, 1e-5, rms)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert norm_err(dx, rdx) <= tol
    assert dw.dtype == db.dtype == _acc(dtype)
    acc_tol = 1e-10 if dtype == torch.float64 else 2e-5  # fp32 accumulation, no final rounding here
    assert norm_err(dw, rdw) <= acc_tol
    if not rms:
        assert norm_err(db, rdb) <= acc_tol


@pytest.mark.parametrize("n", [40, cpu._PAIR_MIN_FEATURES + 52], ids=["one-row", "row-pairs"])
def test_backward_flags_skip_work_and_agree(n):
    """Gradients not asked for are not computed; the others agree with the training case: dx
    bit for bit, db too where rows do not pair (training adds two rows' dy first), dw to fp32
    rounding. dw's term ``dy * xhat`` is computed in two different loops (the training loop and
    the dw-only one), and the kernels' fastmath (reassoc, contract) lets LLVM shape each loop's
    product and FMA on its own, which depends on the target: on an AVX-512 host they agreed bit
    for bit, on an AVX2 one (same znver4 CPU, AVX-512 not exposed) 10 of 40 columns were 1 ulp
    apart."""
    x, dy = torch.randn(30, n), torch.randn(30, n)
    w = torch.randn(n)
    _, _, mean, rstd, _ = cpu.norm_fwd(x, w, None, 1e-5, False)
    full = _without_dres(cpu.norm_bwd(dy, x, w, mean, rstd, False, True, True, True))
    for mask in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        part = _without_dres(cpu.norm_bwd(dy, x, w, mean, rstd, False, *mask))
        for k, (wanted, got, expected) in enumerate(zip(mask, part, full)):
            assert (got is None) != wanted
            if wanted and (k == 0 or (k == 2 and n < cpu._PAIR_MIN_FEATURES)):
                assert torch.equal(got, expected)
            elif wanted:
                assert norm_err(got, expected) <= 1e-6


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_row_pairs_with_non_finite_rows(dtype, with_residual):
    """From ``_PAIR_MIN_FEATURES`` features the forward writes rows two at a time; an odd last
    row and rows holding a NaN or Inf go alone. Each row must match the reference, NaN where
    torch gives NaN; a non-finite weight turns pairs off for bf16 (the careful store)."""
    rows, n = 9, cpu._PAIR_MIN_FEATURES + 52
    torch.manual_seed(3)
    x = torch.randn(rows, n).to(dtype)
    x[2, 11] = float("nan")
    x[5, 3] = float("inf")
    residual = torch.randn(rows, n).to(dtype) if with_residual else None
    for w in (torch.randn(n).to(dtype), torch.full((n,), float("inf")).to(dtype)):
        b = torch.randn(n).to(dtype)
        kwargs = dict(residual=residual, residual_out_dtype=dtype) if with_residual else {}
        out, h, mean, rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, False, **kwargs)
        normalized = h if with_residual else x
        ref = reference.layer_norm(normalized, (n,), w, b, 1e-5)
        assert torch.equal(out.isnan(), ref.isnan())
        finite = ref.isfinite()
        assert max_rel_err(out[finite], ref[finite]) <= FWD_TOL[dtype]


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("n", [33, cpu._PAIR_MIN_FEATURES + 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_rows_whose_squares_overflow_give_torch_s_result(dtype, n, with_residual):
    """A finite row whose centred squares overflow the accumulation type (1e30 among N(0, 1) in
    float32) has a variance past its range: rstd is 0 and every output the bias, as torch gives
    (its variance overflows too), never NaN. The rounding residue of the centred sum is ~1e23 there,
    whose square overflows as well; ``var = sum_sq - c * c`` was inf - inf, and every output of
    the row NaN. The gradients match torch's (dx and dγ 0 on those rows)."""
    torch.manual_seed(5)
    big = 1e200 if dtype == torch.float64 else 1e30
    x = torch.randn(4, n, dtype=torch.float64)
    x[1, 5], x[2, n - 3], x[3, 0], x[3, 1] = big, -big, big, -big
    x = x.to(dtype)
    residual = torch.randn(4, n).to(dtype) if with_residual else None
    w, b, dy = torch.randn(n).to(dtype), torch.randn(n).to(dtype), torch.randn(4, n).to(dtype)
    kwargs = dict(residual=residual, residual_out_dtype=dtype) if with_residual else {}
    out, h, mean, rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, False, **kwargs)
    normalized = h if with_residual else x
    expected, t_mean, t_rstd = torch.ops.aten.native_layer_norm(normalized, [n], w, b, 1e-5)
    assert torch.equal(rstd[1:], torch.zeros(3, dtype=rstd.dtype))
    assert torch.equal(out[1:], b.expand(3, n))
    # torch agrees wherever its own variance is not inf - inf (in float64 its row of +1e200 next
    # to -1e200 at 2148 features gives rstd NaN, every output NaN)
    torch_overflowed = t_rstd.flatten() == 0
    skip_where_older_torch_differs(not torch_overflowed[1:3].all(), "gives rstd NaN for these rows")
    assert torch_overflowed[1:3].all()
    assert torch.equal(out[torch_overflowed], expected[torch_overflowed])
    assert max_rel_err(out[0], expected[0]) <= FWD_TOL[dtype]
    dx, _, dw, db = cpu.norm_bwd(dy, normalized, w, mean, rstd, False, True, True, True)
    t_dx, t_dw, t_db = torch.ops.aten.native_layer_norm_backward(dy, normalized, [n], t_mean, t_rstd, w, b, [True] * 3)
    assert torch.equal(dx[1:], torch.zeros_like(dx[1:]))
    assert torch.equal(t_dx[torch_overflowed], torch.zeros_like(t_dx[torch_overflowed]))
    assert max_rel_err(dx[0], t_dx[0]) <= 10 * FWD_TOL[dtype]
    ref_dx, ref_dw, ref_db = reference.layer_norm_backward(dy[:1], normalized[:1], (n,), w, 1e-5)
    assert norm_err(dw, ref_dw) <= 10 * FWD_TOL[dtype]  # rows 1-3 add nothing to dγ (x-hat 0)
    assert norm_err(db, dy.double().sum(0)) <= 10 * FWD_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ["far-from-zero", "nearly-equal"])
def test_16_bit_rows_centred_on_the_rounded_mean_keep_torch_s_accuracy(dtype, rows):
    """bf16/fp16 rows are centred on the float32 mean in one subtraction (``_centred``): rows far
    from zero, and wide rows of equal values but one in 997 (a spread far under the values'
    spacing), keep the dtype's forward tolerance against float64 and torch's error at most; the
    backward centres x-hat the same way, its gradients against float64 no worse than torch's
    (float32 parameters, so that dγ is not rounded to the dtype)."""
    torch.manual_seed(11)
    if rows == "far-from-zero":
        x = (300 + 4 * torch.randn(64, 2048, dtype=torch.float64)).to(dtype)
    else:
        x = torch.full((4, 65536), 300.0, dtype=torch.float64)
        x[:, ::997] = 302.0  # the next bf16 value (fp16: a few steps up)
        x = x.to(dtype)
    n = x.shape[1]
    w, b = (1 + 0.1 * torch.randn(n)).to(dtype), (0.1 * torch.randn(n)).to(dtype)
    out = cpu.norm_fwd(x, w, b, 1e-5, False)[0]
    want = reference.layer_norm(x, (n,), w, b, 1e-5)
    torch_err = max_rel_err(torch.nn.functional.layer_norm(x, (n,), w, b, 1e-5), want)
    assert max_rel_err(out, want) <= max(torch_err, FWD_TOL[dtype])

    w32, b32 = w.float(), b.float()
    dy = torch.randn(x.shape).to(dtype)
    _, _, mean, rstd, _ = cpu.norm_fwd(x, w32, b32, 1e-5, False)
    dx, _, dw, db = cpu.norm_bwd(dy, x, w32, mean, rstd, False, True, True, True)
    want_grads = reference.layer_norm_backward(dy, x, (n,), w32, 1e-5)
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w32, b32))
    torch_grads = torch.autograd.grad(torch.nn.functional.layer_norm(xt, (n,), wt, bt, 1e-5), (xt, wt, bt), dy)
    for got, theirs, want in zip((dx, dw, db), torch_grads, want_grads):
        assert norm_err(got, want) <= max(norm_err(theirs, want), 1e-6)


@pytest.mark.parametrize("with_residual", [False, True])
def test_next_pair_hints_never_change_the_bits(monkeypatch, with_residual):
    """Whether row pairs hint the next pair into cache depends on the host's L2 size
    (``_PREFETCH_PAIR_MAX_ROW_BYTES``); forward outputs and every gradient are the same bits
    with the hints on and off (rows of 16436 fp32 features: hinted only where L2 is over 1 MiB,
    so both ways are run here by setting the limit)."""
    rows, n = 11, 4 * 4096 + 52
    torch.manual_seed(5)
    x, dy, r, dr = (torch.randn(rows, n) for _ in range(4))
    w, b = torch.randn(n), torch.randn(n)
    kwargs = dict(residual=r, residual_out_dtype=torch.float32) if with_residual else {}
    results = []
    for limit in (0, 1 << 30):
        monkeypatch.setattr(cpu, "_PREFETCH_PAIR_MAX_ROW_BYTES", limit)
        out, h, mean, rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, False, **kwargs)
        h = x if h is None else h
        grads = cpu.norm_bwd(dy, h, w, mean, rstd, False, True, True, True, add=with_residual,
                             dresidual_out=dr if with_residual else None, need_dresidual=with_residual)  # fmt: skip
        results.append([out, mean, rstd, *(g for g in grads if g is not None)])
    for off, on in zip(*results):
        assert torch.equal(off, on)


@pytest.mark.parametrize(
    ("l2", "row_bytes"),
    [(None, 32 << 10), (512 << 10, 32 << 10), (1 << 20, 32 << 10), (2 << 20, 128 << 10), (4 << 20, 256 << 10)],
)
def test_next_pair_hint_limit_follows_the_l2_size(l2, row_bytes):
    """32 KiB rows up to a 1 MiB L2 (measured on the AMD hosts), an L2 sixteenth above it
    (measured on a 2 MiB one); sysfs sizes read as bytes."""
    assert cpu._pair_hint_max_row_bytes(l2) == row_bytes
    assert [cpu._cache_size_bytes(t) for t in ("2048K", "1M", "512")] == [2 << 20, 1 << 20, 512]


@pytest.mark.parametrize(
    ("cpu_name", "bits"),
    [("rocketlake", 512), ("sapphirerapids", 512), ("icelake-server", 512), ("graniterapids", 512),
     ("skylake-avx512", 0), ("cascadelake", 0), ("znver3", 0), ("haswell", 0), ("generic", 0)],
)  # fmt: skip
def test_row_loops_ask_for_512_bit_vectors_from_ice_lake_on(cpu_name, bits):
    """Intel's AVX-512 CPUs from Ice Lake on (measured on one); LLVM's choice elsewhere: 256 bits
    on Skylake-SP and Cascade Lake, whose clocks drop for 512-bit work; none untested."""
    assert cpu._row_loop_vector_bits(cpu_name) == bits


@pytest.mark.parametrize("rows", [2, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_backward_pairs_rows_with_and_without_non_finite_rows(rows, dtype):
    """From ``_PAIR_MIN_FEATURES`` features, training pairs rows for dw/db; an odd last row and
    rows holding a NaN or Inf go alone (the rows after them pair anew). dx must match the
    reference row by row, non-finite where it is; dw and db too."""
    n = cpu._PAIR_MIN_FEATURES + 52
    torch.manual_seed(rows)
    x, dy = torch.randn(rows, n).to(dtype), torch.randn(rows, n).to(dtype)
    w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    if rows > 2:
        dy[1, 5] = float("inf")
        dy[rows - 2, 7] = float("nan")
    _, _, mean, rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, False)
    dx, _, dw, db = cpu.norm_bwd(dy, x, w, mean, rstd, False, True, True, True)
    rdx, rdw, rdb = reference.layer_norm_backward(dy, x, (n,), w, 1e-5, False)
    assert torch.equal(dx.isfinite(), rdx.isfinite())
    finite_rows = rdx.isfinite().all(dim=1)
    assert finite_rows.sum() >= rows - 2
    tol = {torch.float32: 2e-5, torch.bfloat16: 1e-2}[dtype]
    assert norm_err(dx[finite_rows], rdx[finite_rows]) <= tol
    assert torch.equal(dw.isfinite(), rdw.isfinite()) and torch.equal(db.isfinite(), rdb.isfinite())
    finite_cols = rdw.isfinite()
    assert finite_cols.sum() >= n - 2
    assert norm_err(dw[finite_cols], rdw[finite_cols]) <= 2e-5
    assert norm_err(db[finite_cols], rdb[finite_cols]) <= 2e-5


@pytest.mark.parametrize("backend", [cpu, reference], ids=["cpu", "reference"])
@pytest.mark.parametrize("rows", [0, 3, 3000])
def test_parameter_gradients_rounded_once_to_the_asked_dtypes(backend, rows):
    """dweight_dtype / dbias_dtype: the fp32 sums rounded once, the same bits as rounding the
    accumulation-dtype result (one partial chunk, several, and no rows at all)."""
    x, dy = torch.randn(rows, 96).to(torch.bfloat16), torch.randn(rows, 96).to(torch.bfloat16)
    w = torch.randn(96).to(torch.bfloat16)
    _, _, mean, rstd, _ = cpu.norm_fwd(x, w, None, 1e-5, False)
    _, _, dw, db = backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True)
    _, _, dw16, db32 = backend.norm_bwd(dy, x, w, mean, rstd, False, True, True, True,
                                        dweight_dtype=torch.bfloat16, dbias_dtype=torch.float32)  # fmt: skip
    assert dw.dtype == db.dtype == torch.float32
    assert dw16.dtype == torch.bfloat16 and db32.dtype == torch.float32
    assert torch.equal(dw16, dw.to(torch.bfloat16)) and torch.equal(db32, db)


def test_chunking_does_not_depend_on_threads():
    assert cpu.rows_per_chunk(8192, 1024) == 64 and cpu.rows_per_chunk(10, 1024) == 16
    # wide rows: fewer, longer chunks, so that the partial sums stay small
    assert cpu.rows_per_chunk(8192, 768) == 64 and cpu.rows_per_chunk(1024, 4096) == 32
    assert cpu.rows_per_chunk(256, 16384) == 32 and cpu.rows_per_chunk(8192, 4096) == 256


@pytest.mark.parametrize("n_chunks, n", [(128, 1024), (64, 4096), (3, 16384), (1, 8)])
def test_partial_sums_added_in_chunk_order(n_chunks, n):
    # fixed order: chunk 0 + chunk 1 + ..., in float32 (the backward kernel's last step)
    part = torch.randn(n_chunks, n) * torch.logspace(-8, 8, n_chunks).unsqueeze(1)
    expected = part[0].clone()
    for k in range(1, n_chunks):
        expected += part[k]
    total = torch.empty(n)
    cpu._sum_chunks(part.numpy(), total.numpy())
    assert torch.equal(total, expected)


def _forward_backward(x, w, b):
    """normfuse's LayerNorm forward and backward, and torch's forward, of a copy of the inputs."""
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    out = torch.nn.functional.layer_norm(x, x.shape[-1:], w, b)  # torch's own, in the worker too
    y = normfuse.layer_norm(x, x.shape[-1:], w, b)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, w.grad, b.grad, out.detach()


def test_kernels_take_torch_s_intra_op_thread_count():
    # numba's default is every core: with torch told one thread (torchrun, DataLoader workers,
    # one process per core), the kernels must not start more
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no second thread count to compare with")
    x, w, b = torch.randn(512, 1024), torch.randn(1024), torch.randn(1024)  # above the parallel threshold

    def run():
        threads = torch.get_num_threads()
        assert cpu._use_threads(1 << 22) == (threads > 1)
        assert not cpu._use_threads(cpu._PARALLEL_MIN_ELEMENTS - 1)  # small inputs stay on the calling thread
        result = _forward_backward(x, w, b)
        if threads > 1:
            assert numba.get_num_threads() == threads
        return result

    one_thread, two_threads = per_thread_count(run, (1, 2))
    for a, b in zip(one_thread, two_threads):
        assert torch.equal(a, b)  # the same bits whatever the thread count


def test_finite_checks_stay_in_the_array_s_float_type():
    """``_all_finite`` (the parameters, per call) and ``_row_finite`` (the add+norm backward's
    incoming residual gradient, per row) sum ``v * 0``: an int literal 0 made numba widen every
    float32 value to float64 (a loop at half the lanes, 0.3 us of a 4096-feature token's call)."""
    row_finite = numba.njit(lambda a: cpu._row_finite(a, 0))
    v = np.ones((1, 64), dtype=np.float32)
    assert cpu._all_finite(v[0]) and row_finite(v)
    v[0, 40] = np.inf
    assert not cpu._all_finite(v[0]) and not row_finite(v)
    for fn, arg in ((cpu._all_finite, v[0]), (row_finite, v)):
        ir = fn.inspect_llvm((numba.typeof(arg),))
        assert not re.search(r"fpext (<\d+ x )?float", ir)


def test_inference_entry_matches_training_entry():
    x = torch.randn(3, 4, 50).bfloat16()
    w = torch.randn(50)
    out = cpu.norm_fwd_inference(x, 12, 50, w, None, 1e-5, False)
    assert out.shape == x.shape
    assert torch.equal(out.reshape(12, 50), cpu.norm_fwd(x.reshape(12, 50), w, None, 1e-5, False)[0])


@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_residual_add_flags_match_reference(x_dtype, res_dtype, with_residual, dropout_p):
    rows, n = 33, 70
    x = torch.randn(rows, n, dtype=torch.float64).to(x_dtype)
    residual = torch.randn(rows, n, dtype=torch.float64).to(res_dtype) if with_residual else None
    w = (1 + 0.3 * torch.randn(n, dtype=torch.float64)).to(x_dtype)
    kwargs = dict(residual=residual, residual_out_dtype=res_dtype, dropout_p=dropout_p, seed=99, return_mask=True)
    out, h, mean, rstd, mask = cpu.norm_fwd(x, w, None, 1e-5, True, **kwargs)
    _, r_h, _, _, r_mask = reference.norm_fwd(x, w, None, 1e-5, True, **kwargs)
    assert torch.equal(mask, r_mask) and h.dtype == res_dtype and out.dtype == x_dtype
    assert max_rel_err(h, r_h) <= FWD_TOL[res_dtype]
    assert max_rel_err(out, reference.layer_norm(h, (n,), w, None, 1e-5, rms=True)) <= FWD_TOL[x_dtype]
    dy = torch.randn(rows, n, dtype=torch.float64).to(x_dtype)
    dh_out = torch.randn(rows, n, dtype=torch.float64).to(res_dtype)
    bwd = dict(add=True, dresidual_out=dh_out, need_dresidual=with_residual, x_dtype=x_dtype,
               residual_dtype=res_dtype if with_residual else None, dropout_p=dropout_p, seed=99)  # fmt: skip
    dx, dres, dw, db = cpu.norm_bwd(dy, h, w, mean, rstd, True, True, True, False, **bwd)
    rdx, rdres, rdw, _ = reference.norm_bwd(dy, h, w, mean, rstd, True, True, True, False, **bwd)
    tol = {torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-5}
    assert norm_err(dx, rdx) <= tol[x_dtype] and not dx[~mask].any()
    assert (dres is None) == (not with_residual) and db is None
    if with_residual:
        assert norm_err(dres, rdres) <= tol[res_dtype]
    assert norm_err(dw, rdw) <= (1e-10 if x_dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("n", [cpu._PILOT_FEATURES, 1000])
def test_pilot_mean_keeps_statistics_exact_where_the_row_starts_unlike_its_rest(n):
    """The forward's first mean is a pilot over a row's first elements: rows whose first elements
    differ from the rest (an outlier, a step, a large offset there) must keep their accuracy."""
    rows = torch.randn(7, n, dtype=torch.float64)
    rows[0] += 1e4  # a large offset all along: the pilot is close
    rows[1, :3] = 1e6  # outliers among the first elements
    rows[2, : n // 2] += 300.0  # a step: the pilot sees only one side
    rows[3] = rows[3] * 1e-3 + 7.0
    rows[4, 0] = -5e4
    rows[5, 1] = float("inf")
    rows[6, -1] = float("-inf")  # beyond the pilot
    x = rows.float()
    w = torch.randn(n).float()
    b = torch.randn(n).float()
    out, _, mean, rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, False)
    ref_out, _, ref_mean, ref_rstd, _ = reference.norm_fwd(x, w, b, 1e-5, False)
    finite = slice(0, 5)
    assert max_rel_err(out[finite], ref_out[finite]) <= FWD_TOL[torch.float32]
    # the mean to fp32 rounding of the row's largest element (a sum over the row in fp32)
    scale = x[finite].abs().amax(1).double()
    assert ((mean[finite].double() - ref_mean[finite].double()).abs() <= 1e-7 * scale).all()
    assert max_rel_err(rstd[finite], ref_rstd[finite]) < 1e-5
    assert out[5:].isnan().all()


class _NormsInWorker(torch.utils.data.Dataset):
    """A dataset whose items are normfuse forwards and backwards big enough for the thread pool."""

    def __init__(self, x, w, b):
        self.x, self.w, self.b = x, w, b

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return _forward_backward(self.x + i, self.w, self.b)


def test_forked_dataloader_workers_run_the_kernels_with_the_same_bits():
    # numba's GNU OpenMP pool cannot be used in a child forked after it started: the kernels of a
    # forked process run on its own thread (before: the worker was killed at the first kernel)
    x = torch.randn(512, 1024, dtype=torch.float32)  # above the threshold of the parallel path
    w, b = torch.randn(1024), torch.randn(1024)
    assert x.numel() >= cpu._PARALLEL_MIN_ELEMENTS
    in_parent = [_forward_backward(x + i, w, b) for i in range(2)]  # starts the pool here
    loader = torch.utils.data.DataLoader(
        _NormsInWorker(x, w, b), batch_size=None, num_workers=1, multiprocessing_context="fork", timeout=120
    )  # fmt: skip
    in_workers = list(loader)
    for got, want in zip(in_workers, in_parent):
        for g, e in zip(got, want):
            assert torch.equal(g, e)  # the chunks and their order do not depend on threads


_KEEPS_THREAD_COUNT = """
import torch
{set_count}
torch.randn(256, 256) @ torch.randn(256, 256)  # a torch op first: torch has read its count
before = torch.get_num_threads()
import normfuse
x = torch.randn(512, 1024, requires_grad=True)  # above the parallel threshold
normfuse.layer_norm(x, (1024,)).sum().backward()
normfuse.rms_norm(torch.randn(8, 64), (64,))
print(before, torch.get_num_threads())
"""


@pytest.mark.parametrize("how", ["set_num_threads", "OMP_NUM_THREADS"])
def test_first_kernel_leaves_torch_s_thread_count_as_it_was(how):
    # Starting numba's pool set the OpenMP count the two libraries share to every core: after
    # normfuse's first kernel, each torch op of a process told one thread ran on all of them.
    # The pool starts once per process: only a fresh process shows it.
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: every thread count is the default")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    if how == "OMP_NUM_THREADS":
        env["OMP_NUM_THREADS"] = "1"
    code = _KEEPS_THREAD_COUNT.format(set_count="torch.set_num_threads(1)" if how == "set_num_threads" else "")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]


def test_kernels_release_the_gil_and_threads_calling_at_once_get_serial_results():
    # torch's ops release the GIL; the kernels do too (``nogil``), so that Python threads calling
    # normfuse run their kernels side by side. Holding it for a kernel's milliseconds made two such
    # threads take 1.5-5x as long as one thread doing both's work (GIL hand-offs wait for
    # Python's 5 ms switch interval): see benchmarks/threads_cpu.py.
    for kernel in (cpu._fwd, cpu._bwd):
        assert kernel.targetoptions.get("nogil") is True
    inputs = [torch.randn(512, 1024).to(dtype) for dtype in (torch.float32, torch.bfloat16) for _ in range(3)]
    w, b = torch.randn(1024), torch.randn(1024)
    serial = [_forward_backward(x, w.to(x.dtype), b.to(x.dtype)) for x in inputs]
    results: dict[int, tuple] = {}

    def work(i):
        for _ in range(3):
            results[i] = _forward_backward(inputs[i], w.to(inputs[i].dtype), b.to(inputs[i].dtype))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=300)
    assert sorted(results) == list(range(len(inputs)))
    for i, want in enumerate(serial):
        for got, expected in zip(results[i], want):
            assert torch.equal(got, expected)


def test_launchers_call_each_signature_s_entry_point_with_the_dispatcher_s_bits(monkeypatch):
    """The launchers call a kernel's compiled entry point past numba's dispatcher: one per key,
    the entry point of the signature the dispatcher chose, the same results. (The rest of the
    suite runs with the key check on, which keeps the entry points out of the dict.)"""
    monkeypatch.setattr(cpu._EntryPoints, "check_keys", False)
    x = torch.randn(5, 300)
    w, b = torch.randn(300), torch.randn(300)
    for dtype in (torch.float32, torch.bfloat16):  # compiled (and reloaded) before what is tested
        cpu.norm_fwd_inference(x.to(dtype), 5, 300, w.to(dtype), b.to(dtype), 1e-5, False)
    through_dispatcher = []
    for dtype in (torch.float32, torch.bfloat16):
        cpu._fwd_kernel.forget()
        through_dispatcher.append(cpu.norm_fwd_inference(x.to(dtype), 5, 300, w.to(dtype), b.to(dtype), 1e-5, False))
    entries = dict(cpu._fwd_kernel)
    assert len(entries) == 1  # the float32 key was forgotten with the second forget
    for dtype, want in zip((torch.float32, torch.bfloat16), through_dispatcher):
        got = cpu.norm_fwd_inference(x.to(dtype), 5, 300, w.to(dtype), b.to(dtype), 1e-5, False)
        assert torch.equal(got, want)
    assert len(cpu._fwd_kernel) == 2
    compiled = {id(c.entry_point) for c in cpu._fwd.overloads.values()}
    assert all(id(entry) in compiled for entry in cpu._fwd_kernel.values())


def test_key_check_catches_a_key_that_stands_for_two_signatures(monkeypatch):
    monkeypatch.setattr(cpu._EntryPoints, "check_keys", True)
    x32, x16 = torch.randn(2, 64), torch.randn(2, 64).bfloat16()
    w = torch.randn(64)
    out32, out16 = torch.empty_like(x32), torch.empty_like(x16)

    def launch(x, out, key):
        kind = cpu._KIND[x.dtype]
        cpu._fwd_kernel[key](
            0, 0, 0, x.data_ptr(), w.data_ptr(), w.data_ptr(), out.data_ptr(), 0, 0, 2, 64, np.float32(1e-5), False,
            False, None, None, None, None, kind, cpu._KIND[w.dtype], kind, None, None, 2, False, False, np.float32(0.0),
        )  # fmt: skip

    cpu._fwd_kernel.forget()
    launch(x32, out32, "one key")
    launch(x32, out32, "one key")
    assert max_rel_err(out32, reference.layer_norm(x32, (64,), w, w, 1e-5)) <= FWD_TOL[torch.float32]
    with pytest.raises(AssertionError, match="stands for"):
        launch(x16, out16, "one key")
    cpu._fwd_kernel.forget()


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("nan_bits", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC08000])
def test_add_keeps_nan_whose_rounding_to_bf16_would_carry(nan_bits, rms):
    """A float32 NaN whose low mantissa bits carry when rounded to bf16 the fast way (0x7FFFFFFF
    would come out -0.0, 0xFFFFFFFF +0.0) must still be NaN in the bf16 sum h: the add's
    vectorizable store does not check, the row's non-finite plain sum sends it to the careful
    store (a check on the stored row would miss the -0.0)."""
    rows, n = 6, 200
    torch.manual_seed(0)
    x, r = torch.randn(rows, n), torch.randn(rows, n)
    nan = torch.tensor([nan_bits], dtype=torch.int64).to(torch.int32).view(torch.float32)
    x[1, 5] = nan
    x[3, n - 1] = nan
    r[4, 0] = float("inf")
    w, b = torch.randn(n), torch.randn(n)
    out, h, _, _, _ = cpu.norm_fwd(x, w, None if rms else b, 1e-5, rms, residual=r,
                                   residual_out_dtype=torch.bfloat16)  # fmt: skip
    expected_h = (x + r).to(torch.bfloat16)
    assert torch.equal(torch.isnan(h), torch.isnan(expected_h))
    finite = torch.isfinite(expected_h)
    assert torch.equal(h[finite], expected_h[finite])
    assert torch.equal(h.isinf(), expected_h.isinf())
    # the rows with a NaN or Inf normalize as torch's do (NaN, or for RMSNorm over an Inf, 0s)
    expected = F.rms_norm(h.float(), (n,), w) if rms else F.layer_norm(h.float(), (n,), w, b)
    assert torch.isnan(out[[1, 3, 4]]).any(dim=1).all()
    torch.testing.assert_close(out.float(), expected, equal_nan=True)


def test_the_kernels_source_carries_the_fingerprint_of_the_helpers_they_inline():
    """numba's cache is keyed on cpu.py's contents: an edit of _numba_bits.py must change cpu.py
    too, or processes would load kernels compiled against the old helpers."""
    import hashlib
    from pathlib import Path

    from normfuse.backends import _numba_bits

    actual = hashlib.sha256(Path(_numba_bits.__file__).read_bytes()).hexdigest()
    assert cpu.NUMBA_BITS_SHA256 == actual, f"set NUMBA_BITS_SHA256 in backends/cpu.py to {actual!r}"
