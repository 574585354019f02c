"""CPU backend: numba kernels for the normalization forward and backward.

One kernel source serves every variant: ``rms`` drops the mean (RMSNorm), and the storage
dtype (float32, float64, bf16 as uint16 bits, fp16 as int16 bits) is picked at compile time
by the helpers in ``_numba_bits``. Arithmetic is float32 for fp32/bf16/fp16 and float64 for
fp64.

Forward, per row (a row of a few thousand features stays in L1/L2 after the first read, so
the three loops below cost one read of memory):
  1. ``m1 = sum(x) / n``, a rough mean (fp32 lanes, vectorized).
  2. ``d = x - m1``; ``c = sum(d) / n`` corrects ``m1``, ``var = sum(d^2)/n - c^2``. This is the
     corrected two-pass algorithm: its error does not grow with the row's mean, unlike
     ``E[x^2] - E[x]^2`` which loses every digit at a mean of 1e4 in fp32.
  3. ``y = ((x - m1) - c) * rstd * w + b``.

Backward, per row, with ``xhat = (x - mean) * rstd`` and ``g = dy * w``:
  ``dx = rstd * (g - xhat * mean(xhat * g) - mean(g))``, ``dw += dy * xhat``, ``db += dy``.
  ``xhat`` is recomputed centered (and the fp32-rounded saved mean is corrected by
  ``mean(x - mean)``), so dx does not degrade with the row's mean. dw/db accumulate in the
  accumulation type (fp32 for bf16/fp16) into one partial row per fixed-size chunk of rows,
  and the partial rows are summed in chunk order: the result is bitwise the same whatever
  the number of threads.

The kernels release the GIL (``nogil``), as torch's own ops do: Python threads that call
normfuse at once run their kernels at once. (Holding it for a kernel's milliseconds, two such
threads took 1.5-5x as long as one thread doing the work of both: each hand-off of the GIL
waited for Python's 5 ms switch interval. ``benchmarks/threads_cpu.py``.)

This module imports nothing from the front end; it takes 2-D row-major tensors.
"""

from __future__ import annotations

import functools
import os
import threading

# numba's OpenMP thread pool is a second pool beside torch's (torch bundles its own libgomp).
# With OpenMP's default spin-waiting, numba's idle workers would keep spinning after each
# kernel and steal the cores torch's next op needs (and 2-3x slower torch ops were measured
# here, interleaved). Passive waiting for numba's pool only: this libgomp is loaded after
# torch's and reads the variable then; torch's pool is not affected. A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch
from numba import carray, njit, prange, types
from numba import config as numba_config
from numba import get_num_threads as numba_get_num_threads
from numba import set_num_threads as numba_set_num_threads
from numba.core import event as numba_event
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload
from numba.np.ufunc import parallel as numba_parallel

from normfuse import _dropout
from normfuse._dtypes import acc_dtype
from normfuse.backends._buffers import bwd_buffers, fwd_buffers, rounded, sums_over_no_rows
from normfuse.backends._numba_bits import (
    acc_scalar,
    address_as_pointer,
    keep_bit,
    load,
    prefer_vector_width,
    prefetch_line,
    round_as,
    round_as_not_nan,
    select,
    store,
    store_not_nan,
)

# numba keys its on-disk cache on this file's contents alone, not on the helpers the kernels
# inline from _numba_bits.py: kernels compiled against an older _numba_bits.py would load as they
# were (the twenty-fifth session measured stale fp16 kernels that way). This fingerprint of
# _numba_bits.py, checked by tests/backends/test_cpu.py, makes an edit there an edit here.
NUMBA_BITS_SHA256 = "fba8f4e6f6599c67931867f08d0ff693cdfc352153d04e2957273b73ef5642fb"

# numba's "internal pedantic check" of variable scopes (its words) misfires when an inlined
# overload is called from two places in one loop (the row-pair code does); the kernels are
# checked by the tests, and a user's first compile should not print numba's internals.
warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning, module=r".*normfuse[/\\.]backends[/\\.]cpu")

# reassoc lets LLVM split the row sums across SIMD lanes (deterministic: fixed at compile
# time); contract allows FMA. No nnan/ninf: NaN and Inf must propagate as in torch.
_FASTMATH = {"reassoc", "contract"}

# Below this many elements (1 MiB of fp32) the kernels stay on the calling thread: waking
# numba's pool, which shares two cores with torch's, cost more than it saved on the demo's
# 1024x128 activations (measured with `normfuse demo`: tokens/s level with torch this way).
_PARALLEL_MIN_ELEMENTS = 1 << 18


_numba_pool_started = False


def _start_numba_pool() -> None:
    """Start numba's thread pool, leaving torch's intra-op thread count as it was.

    numba's OpenMP layer and torch share one libgomp; starting the pool (which numba does at a
    parallel kernel's first call) sets the calling thread's OpenMP thread count to numba's
    default, every core, and torch reads its count from there: a process that had run
    ``torch.set_num_threads(1)`` (or torchrun's ``OMP_NUM_THREADS=1``) and any torch op ran
    every later torch op on all cores after normfuse's first kernel. Started here once, with
    torch's count put back.
    """
    global _numba_pool_started
    _numba_pool_started = True
    launch = getattr(numba_parallel, "_launch_threads", None)  # a numba internal: used only if present
    if launch is None:
        return
    count = torch.get_num_threads()
    launch()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


# What each calling thread last set numba's pool to (numba's count is per calling thread), by
# torch's count it was set from. Asking numba its count costs 24 us once a kernel has emptied the
# caches (``benchmarks/overhead_cpu.py``), a backward asks twice: it is asked only when torch's
# count has changed since this thread last set it.
_numba_threads_set = threading.local()


def _use_threads(elements: int) -> bool:
    """Whether a kernel over this many elements takes numba's thread pool, and if so, sets the
    pool to torch's intra-op thread count (``torch.set_num_threads``; torchrun's and DataLoader
    workers' one thread): numba's own default is every core, whatever torch was told, and
    several processes each running that many threads oversubscribe the machine. Both counts are
    per calling thread; torch's is read each time, and numba's set again when torch's differs
    from the one this thread last set it from (a count set with ``numba.set_num_threads`` itself
    holds until then). Results do not depend on it (fixed chunks).
    Every launcher asks this before its kernel: the first time, it starts numba's pool
    (``_start_numba_pool``)."""
    if not _numba_pool_started:
        _start_numba_pool()
    if elements < _PARALLEL_MIN_ELEMENTS:
        return False
    threads = torch.get_num_threads()
    if getattr(_numba_threads_set, "torch_count", None) != threads:
        count = min(threads, numba_config.NUMBA_NUM_THREADS)
        if count > 1 and numba_get_num_threads() != count:
            numba_set_num_threads(count)
        _numba_threads_set.torch_count = threads
    return threads > 1 and numba_config.NUMBA_NUM_THREADS > 1


def _serial_after_fork() -> None:
    # A process forked after numba started its GNU OpenMP pool cannot use that pool: numba kills
    # it at the first parallel region ("fork() called from a process already using GNU OpenMP,
    # this is unsafe"). DataLoader workers and other forked children run the kernels on their
    # own thread instead: the same chunks in the same order, so the same bits.
    global _PARALLEL_MIN_ELEMENTS
    _PARALLEL_MIN_ELEMENTS = np.iinfo(np.int64).max


os.register_at_fork(after_in_child=_serial_after_fork)

# From this many features a row, the kernels take rows in pairs: the training backward
# (``_bwd_row_pair``), whose dw/db accumulator rows no longer fit L1 beside the row, and the
# forward's output sweep (``_fwd_row_pair_out``), whose w and b rows no longer do; reading
# them once for two rows pays (backward 1.1-1.2x at 4096 and 16384 features); on narrower
# rows the one-row loop was faster (backward pairs 0.7-0.9x at 768 and 1024 fp32 features;
# `benchmarks/ab_cpu.py`).
_PAIR_MIN_FEATURES = 2048
# elements of a row that give the forward its pilot mean (see _fwd_row_stats)
_PILOT_FEATURES = 64


# --- optional operands -----------------------------------------------------------------------
# The residual, the dropout state, the mask output, the x-hat rounding and the gradient
# outputs are either arrays or None. Helpers overloaded on None make each combination its own
# compiled specialization (compile-time flags: no branch in the inner loops), from one source.


def _is_none(t):
    return t is None or isinstance(t, types.NoneType)


def _plus(a, v, i, j):
    """v + a[i, j] (a None: v)."""


@overload(_plus, inline="always")
def _plus_overload(a, v, i, j):
    if _is_none(a):
        return lambda a, v, i, j: v
    return lambda a, v, i, j: v + load(a, i, j)


def _put(a, i, j, v):
    """store(a, i, j, v) (a None: nothing)."""


@overload(_put, inline="always")
def _put_overload(a, i, j, v):
    if _is_none(a):
        return lambda a, i, j, v: None
    return lambda a, i, j, v: store(a, i, j, v)


def _put_not_nan(a, i, j, v):
    """store_not_nan(a, i, j, v) (a None: nothing)."""


@overload(_put_not_nan, inline="always")
def _put_not_nan_overload(a, i, j, v):
    if _is_none(a):
        return lambda a, i, j, v: None
    return lambda a, i, j, v: store_not_nan(a, i, j, v)


@njit(inline="always")
def _fmix32(h):
    # murmur3's finalizer on 32 bits held in a uint64 (masked after each multiply); once per
    # row, for the row key (the per-element hash is ``keep_bit``, in 32-bit vector operations)
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(_dropout.FMIX_1)) & np.uint64(_dropout.MASK32)
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(_dropout.FMIX_2)) & np.uint64(_dropout.MASK32)
    return h ^ (h >> np.uint64(16))


def _row_key(drop, i):
    """The per-row part of the dropout hash (see normfuse._dropout); 0 without dropout."""


@overload(_row_key, inline="always")
def _row_key_overload(drop, i):
    if _is_none(drop):
        return lambda drop, i: np.uint64(0)

    def impl(drop, i):
        lo, hi = drop[2], drop[3]
        inner = (np.uint64(i) * np.uint64(_dropout.ROW_MULTIPLIER) + hi) & np.uint64(_dropout.MASK32)
        return _fmix32(lo ^ _fmix32(inner))

    return impl


def _kept(drop, key, j):
    """Whether element j of the row with this key survives dropout (always, without dropout)."""


@overload(_kept, inline="always")
def _kept_overload(drop, key, j):
    if _is_none(drop):
        return lambda drop, key, j: True

    def impl(drop, key, j):
        return keep_bit(key, j, drop[0])

    return impl


def _dropped(drop, v, keep):
    """v scaled by 1/(1-p) if kept, else 0 (v itself without dropout)."""


@overload(_dropped, inline="always")
def _dropped_overload(drop, v, keep):
    if _is_none(drop):
        return lambda drop, v, keep: v
    # a select, not a product with the mask: a dropped Inf gives 0, not NaN
    return lambda drop, v, keep: select(keep, v * drop[1], _scalar_like(v, 0.0))


def _scalar_like(v, c):
    """c in v's float type."""


@overload(_scalar_like, inline="always")
def __scalar_like_overload(v, c):
    if v == types.float64:
        return lambda v, c: np.float64(c)
    return lambda v, c: np.float32(c)


def _put_keep(mask, i, j, keep):
    """mask[i, j] = keep (mask None: nothing)."""


@overload(_put_keep, inline="always")
def _put_keep_overload(mask, i, j, keep):
    if _is_none(mask):
        return lambda mask, i, j, keep: None

    def impl(mask, i, j, keep):
        mask[i, j] = np.uint8(keep)

    return impl


def _add_row(x, res, drop, mask_out, h, i):
    """h[i] = dropout(x[i]) + res[i], rounded to h's dtype (x None: nothing to do, h is the input)."""


@overload(_add_row, inline="always", jit_options={"fastmath": _FASTMATH})
def _add_row_overload(x, res, drop, mask_out, h, i):
    if _is_none(x):
        return lambda x, res, drop, mask_out, h, i: None

    # Only bf16's vectorizable store differs from the careful one: it can round a NaN to Inf or
    # +-0. Its row is stored again the careful way where the plain sum of the values is not
    # finite (a NaN or Inf among them, or an overflow, after which the careful store gives the
    # same bits): one vector add a block, and whatever order LLVM sums in, the same decision
    # but for the overflows. Other dtypes' sums are dead code, dropped.
    check = h.dtype == types.uint16

    def impl(x, res, drop, mask_out, h, i):
        key = _row_key(drop, i)
        total = acc_scalar(h, 0.0)
        for j in range(h.shape[1]):
            keep = _kept(drop, key, j)
            _put_keep(mask_out, i, j, keep)
            v = _plus(res, _dropped(drop, load(x, i, j), keep), i, j)
            store_not_nan(h, i, j, v)
            total += v
        if check and not np.isfinite(total):
            for j in range(h.shape[1]):
                store(h, i, j, _plus(res, _dropped(drop, load(x, i, j), _kept(drop, key, j)), i, j))

    return impl


def _row_finite(a, i):
    """Whether row i of a holds no NaN or Inf (a None: True)."""


@overload(_row_finite, inline="always", jit_options={"fastmath": _FASTMATH})
def _row_finite_overload(a, i):
    if _is_none(a):
        return lambda a, i: True

    def impl(a, i):
        # v * 0 is NaN exactly for NaN and Inf: a branch-free, vectorizable test. The zero of the
        # array's own type: an int 0 would take float32 to float64, a loop at half the lanes (it
        # was, until the twentieth session: 0.2 us of a bf16 token's 2.5 us kernel call for each
        # parameter)
        zero = acc_scalar(a, 0.0)
        s = zero
        for j in range(a.shape[1]):
            s += load(a, i, j) * zero
        return s == zero

    return impl


# --- the next row, hinted into cache while this one is worked on -----------------------------
# In the forward and the backward alike, a row's statistics loop is the only one that reads
# memory; the loop that writes the output (dx) works from L1, and its stores miss (each line
# is read before it is written). Left alone, memory idles through that loop and the stores
# then queue behind their misses, with the L1 hits of the backward's dγ/dβ accumulators stuck
# behind them (stores retire in order). So the writing loop runs in blocks of _BLOCK elements,
# and before each block hints the same columns of the next row: its inputs to be read, its
# outputs to be written (``prefetchw``). Constant-trip blocks from ``k * _BLOCK`` keep the
# loop vectorized; a bound of ``min(n, j0 + _BLOCK)`` was seen to vectorize on 64-bit index
# vectors. Hints into L1 (locality 3): a port hinting the input into L2 only gained the forward
# 1-10% on the third session's host (RESULTS.md). Measured in `benchmarks/prefetch_bwd_probe.py` and
# `benchmarks/ab_cpu.py` (RESULTS.md, thirteenth and fourteenth sessions).
_BLOCK = 64
# Rows in pairs hint the next pair (two rows) ahead while the next pair, the current one and
# the parameter rows stay in L2 together. How wide that is was measured per host
# (`benchmarks/bench_cpu.py`, RESULTS.md): on the AMD hosts (512 KiB and 1 MiB of L2 a core) up
# to 32 KiB rows: at 16384 fp32 features (64 KiB rows) the next pair's 384 KiB beside the
# current pair's overflowed what L2 keeps, and the backward's hints cost 8-19%
# (`benchmarks/ab_cpu.py`); bf16 at 16384 gained 1.2x. On an Intel host with 2 MiB of L2,
# 64 and 128 KiB rows gained too (fp32 forward at 16384 and 32768 features 1.2-1.4x faster,
# forward+backward 1.13-1.32x; `benchmarks/ab_cpu.py`'s small working set showed nothing: the
# hints pay where the output's lines come from memory), so the limit grows with L2 beyond 1 MiB:
# an L2 sixteenth.
_PAIR_HINT_MIN_ROW_BYTES = 32 * 1024


def _l2_cache_bytes() -> int | None:
    """The per-core L2 (data or unified) cache's size as Linux reports it; None where unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            level = _read_text(os.path.join(base, index, "level"))
            kind = _read_text(os.path.join(base, index, "type"))
            if level == "2" and kind in ("Data", "Unified"):
                return _cache_size_bytes(_read_text(os.path.join(base, index, "size")))
    except (OSError, ValueError):
        pass
    return None


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _cache_size_bytes(text: str) -> int:
    """sysfs's cache size ("2048K", "1M", "512") in bytes."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


def _pair_hint_max_row_bytes(l2_bytes: int | None) -> int:
    """The widest row (bytes) whose pairs hint the next pair: 32 KiB up to a 1 MiB L2, an
    L2 sixteenth above (see ``_PAIR_HINT_MIN_ROW_BYTES``)."""
    if l2_bytes is None or l2_bytes <= 1 << 20:
        return _PAIR_HINT_MIN_ROW_BYTES
    return max(_PAIR_HINT_MIN_ROW_BYTES, l2_bytes // 16)


# Read once, at import; a runtime argument of the kernels, not a constant compiled into them
# (numba's cache would keep the value of the host that compiled them).
_PREFETCH_PAIR_MAX_ROW_BYTES = _pair_hint_max_row_bytes(_l2_cache_bytes())


# --- vector width -----------------------------------------------------------------------------
# LLVM tunes Intel's AVX-512 CPUs to vectorize 256 bits wide ("prefer-256-bit": on Skylake-SP and
# Cascade Lake, 512-bit arithmetic lowers the clock). The row loops (``_fwd_block``,
# ``_bwd_rows``) ask for 512 bits on Intel's CPUs from Ice Lake on, where that cost is said to be
# small: on one host of that kind (LLVM name ``rocketlake``; the others are not measured) the
# bf16 forward and backward kernels ran 1.08-1.21x faster, fp32 1.02-1.06x
# (`benchmarks/ab_cpu.py`, RESULTS.md, nineteenth session). Per function (an LLVM
# function attribute), not numba's target options, which would apply to every numba function in
# the process. A constant compiled into the kernels: numba's cache keys its entries by CPU name.
_WIDE_VECTOR_CPUS = frozenset({
    "icelake-client", "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
    "graniterapids", "graniterapids-d", "diamondrapids",
})  # fmt: skip


def _row_loop_vector_bits(cpu_name: str) -> int:
    """The vector width (bits) the row loops ask LLVM for on a CPU of that LLVM name; 0: LLVM's own."""
    return 512 if cpu_name in _WIDE_VECTOR_CPUS else 0


def _target_cpu_name() -> str:
    """The CPU numba compiles for: ``NUMBA_CPU_NAME`` where set (``generic`` for portable caches),
    else the host's."""
    from llvmlite import binding as llvm

    return numba_config.CPU_NAME or llvm.get_host_cpu_name()


_ROW_LOOP_VECTOR_BITS = _row_loop_vector_bits(_target_cpu_name())


def _prefetch_block(a, i, j0, for_write):
    """Hint a[i, j0:j0 + _BLOCK] into cache (a None: nothing)."""


@overload(_prefetch_block, inline="always")
def _prefetch_block_overload(a, i, j0, for_write):
    if _is_none(a):
        return lambda a, i, j0, for_write: None
    write = bool(getattr(for_write, "literal_value", False))
    line_elements = 64 // (a.dtype.bitwidth // 8)  # elements of a 64-byte line

    if write:

        def impl(a, i, j0, for_write):
            start = a.ctypes.data + i * a.strides[0] + j0 * a.itemsize
            for q in range(_BLOCK // line_elements):
                prefetch_line(start + q * 64, True, 3)

        return impl

    def impl(a, i, j0, for_write):
        start = a.ctypes.data + i * a.strides[0] + j0 * a.itemsize
        for q in range(_BLOCK // line_elements):
            prefetch_line(start + q * 64, False, 3)

    return impl


def _prefetch_fwd_row(x, res, h, out, i, j0):
    """The forward's hints for row i: without a residual add (x None) it reads h and writes out;
    with one it reads x and res and writes h (the sum) and out."""


@overload(_prefetch_fwd_row, inline="always")
def _prefetch_fwd_row_overload(x, res, h, out, i, j0):
    if _is_none(x):

        def impl(x, res, h, out, i, j0):
            _prefetch_block(h, i, j0, False)
            _prefetch_block(out, i, j0, True)

        return impl

    def impl(x, res, h, out, i, j0):
        _prefetch_block(x, i, j0, False)
        _prefetch_block(res, i, j0, False)
        _prefetch_block(h, i, j0, True)
        _prefetch_block(out, i, j0, True)

    return impl


@njit(inline="always")
def _prefetch_bwd_row(dy, h, dh_out, dx, dres, i, j0):
    """The backward's hints for row i: it reads dy, h and dh_out, writes dx and dres."""
    _prefetch_block(dy, i, j0, False)
    _prefetch_block(h, i, j0, False)
    _prefetch_block(dh_out, i, j0, False)
    _prefetch_block(dx, i, j0, True)
    _prefetch_block(dres, i, j0, True)


@njit(fastmath=_FASTMATH, inline="always")
def _fwd_row_stats(x, res, drop, mask_out, h, mean, rstd, eps, rms, store_stats, i):
    """Row i's statistics (m1, c, r): mean = m1 + c, rstd = r. With a residual add (x given),
    the sum ``h`` is written first and then read back from L1/L2 by the loops below; without
    one ``h`` is the input itself."""
    n = h.shape[1]
    inv_n = acc_scalar(h, 1.0 / n)
    _add_row(x, res, drop, mask_out, h, i)
    m1 = acc_scalar(h, 0.0)
    if not rms:
        # A pilot mean of the row's first elements, not a whole pass: the centred sums below
        # correct it (c), and while c * c <= var their cancellation costs var at most one more
        # ulp. A row where it would cost more (an outlier among its first elements; NaN, Inf)
        # takes the centred sums again around the corrected mean m1 + c, as accurate as the sum
        # pass it replaces. This saves one of the forward's three passes over the row wherever
        # the pilot holds: 1.11-1.21x on the bf16 forward (benchmarks/ab_cpu.py --forward).
        # The sums are not inside the add's loop: a sum in a loop that also stores lets LLVM
        # choose a scalar or a vector order by runtime pointer-overlap checks (rounding would
        # then depend on buffer addresses).
        k = min(n, _PILOT_FEATURES)
        s = acc_scalar(h, 0.0)
        for j in range(k):
            s += load(h, i, j)
        m1 = s / acc_scalar(h, k)
    sd, sdd = _centred_sums(h, i, m1)
    c = acc_scalar(h, 0.0) if rms else sd * inv_n
    var = sdd * inv_n - c * c
    if sdd == np.inf and np.isfinite(sd):
        # A finite row whose squares overflow (|h - mean| past 1.8e19 in float32): its variance
        # is past the accumulation type's range, so rstd is 0, as torch's overflowing variance
        # gives it (every output is then the bias). c * c may overflow as well here, and inf - inf
        # must not leave a NaN for the outputs of a row without one.
        var = sdd
    elif not rms and not c * c <= var:
        m1 = m1 + c
        sd, sdd = _centred_sums(h, i, m1)
        c = sd * inv_n
        var = sdd * inv_n - c * c
    if var < 0:
        var = acc_scalar(h, 0.0)
    r = acc_scalar(h, 1.0) / np.sqrt(var + eps)
    if store_stats:
        mean[i] = m1 + c
        rstd[i] = r
    return m1, c, r


@njit(fastmath=_FASTMATH, inline="always")
def _centred_sums(h, i, m1):
    """(sum of d, sum of d * d) over row i, d = h - m1."""
    sd = acc_scalar(h, 0.0)
    sdd = acc_scalar(h, 0.0)
    for j in range(h.shape[1]):
        d = load(h, i, j) - m1
        sd += d
        sdd += d * d
    return sd, sdd


def _centred(h, v, m1, c):
    """v - mean, with mean = m1 + c: the forward's pilot mean and its correction, or the
    backward's saved mean and its correction (x-hat in ``_dh`` and the dγ loop)."""


@overload(_centred, inline="always", jit_options={"fastmath": _FASTMATH})
def _centred_overload(h, v, m1, c):
    # A float32/float64 row subtracts the two parts one after the other: v - m1 is exact where v
    # is near m1, so a row mean of 1e6 costs no digits. A bf16/fp16 row's values carry 8 or 11
    # bits: the mean rounded once to float32 is off by at most 2^-17 (fp16: 2^-14) of their
    # spacing, which the output's own rounding to 8 or 11 bits hides but in rows of nearly equal
    # values, so one subtraction of it serves, and the bf16 forward's output loop is one vector
    # operation shorter (1.01-1.12x, `benchmarks/ab_cpu.py --forward`; RESULTS.md, eighteenth
    # session; the backward's loops likewise, 1.02-1.09x, nineteenth). RMSNorm's m1 and c are 0:
    # the same bits either way.
    if h.dtype.bitwidth == 16:
        return lambda h, v, m1, c: v - (m1 + c)
    return lambda h, v, m1, c: (v - m1) - c


@njit(fastmath=_FASTMATH, inline="always")
def _fwd_row_out(x, res, h, w, b, out, xhat_like, params_finite, i, m1, c, r):
    """Row i's output from its statistics (x and res: the next row's operands to hint)."""
    n = h.shape[1]
    if params_finite and np.isfinite(m1 + c) and np.isfinite(r):
        # h is finite (else m1 is not), so no output can be NaN: the vectorizable store
        ahead = i + 1 < h.shape[0]
        n_blocks = n // _BLOCK
        for k in range(n_blocks):
            j0 = k * _BLOCK
            if ahead:
                _prefetch_fwd_row(x, res, h, out, i + 1, j0)
            for j in range(j0, j0 + _BLOCK):
                _fwd_out_element(h, w, b, out, xhat_like, i, j, m1, c, r)
        for j in range(n_blocks * _BLOCK, n):
            _fwd_out_element(h, w, b, out, xhat_like, i, j, m1, c, r)
    else:
        for j in range(n):
            store(out, i, j, round_as(xhat_like, _centred(h, load(h, i, j), m1, c) * r) * w[j] + b[j])


@njit(fastmath=_FASTMATH, inline="always")
def _fwd_row_pair_out(x, res, h, w, b, out, xhat_like, hint_next_pair, i, m1a, ca, ra, m1b, cb, rb):
    """Rows i and i + 1's outputs, neither with a NaN, in one sweep: w and b read once for both."""
    n = h.shape[1]
    ahead = hint_next_pair and i + 3 < h.shape[0]
    n_blocks = n // _BLOCK
    for k in range(n_blocks):
        j0 = k * _BLOCK
        if ahead:
            _prefetch_fwd_row(x, res, h, out, i + 2, j0)
            _prefetch_fwd_row(x, res, h, out, i + 3, j0)
        for j in range(j0, j0 + _BLOCK):
            _fwd_pair_out_element(h, w, b, out, xhat_like, i, j, m1a, ca, ra, m1b, cb, rb)
    for j in range(n_blocks * _BLOCK, n):
        _fwd_pair_out_element(h, w, b, out, xhat_like, i, j, m1a, ca, ra, m1b, cb, rb)


@njit(fastmath=_FASTMATH, inline="always")
def _fwd_out_element(h, w, b, out, xhat_like, i, j, m1, c, r):
    """Element (i, j) of a row with no NaN to come."""
    store_not_nan(out, i, j, round_as_not_nan(xhat_like, _centred(h, load(h, i, j), m1, c) * r) * w[j] + b[j])


@njit(fastmath=_FASTMATH, inline="always")
def _fwd_pair_out_element(h, w, b, out, xhat_like, i, j, m1a, ca, ra, m1b, cb, rb):
    """Column j of rows i and i + 1, neither with a NaN to come."""
    w_v = w[j]
    b_v = b[j]
    ya = round_as_not_nan(xhat_like, _centred(h, load(h, i, j), m1a, ca) * ra) * w_v + b_v
    yb = round_as_not_nan(xhat_like, _centred(h, load(h, i + 1, j), m1b, cb) * rb) * w_v + b_v
    store_not_nan(out, i, j, ya)
    store_not_nan(out, i + 1, j, yb)


@njit(fastmath=_FASTMATH)
def _all_finite(v):
    """Whether the (n,) array v holds no NaN or Inf: ``_row_finite`` of it as one row."""
    return _row_finite(v.reshape((1, v.shape[0])), 0)


@njit
def _view(address, n_rows, n, kind):
    return carray(address_as_pointer(address, kind), (n_rows, n))


def _opt_view(address, n_rows, n, kind):
    """``_view``, or None when kind is None (an operand that is absent)."""


@overload(_opt_view)
def _opt_view_overload(address, n_rows, n, kind):
    if _is_none(kind):
        return lambda address, n_rows, n, kind: None
    return lambda address, n_rows, n, kind: _view(address, n_rows, n, kind)


def _widen(p, like):
    """A (1, n) parameter view as an (n,) array of like's dtype (the view itself when it is one)."""


@overload(_widen)
def _widen_overload(p, like):
    if p.dtype == like.dtype:
        return lambda p, like: p[0]

    def impl(p, like):
        out = np.empty(p.shape[1], dtype=like.dtype)
        for j in range(p.shape[1]):
            out[j] = load(p, 0, j)
        return out

    return impl


# A function of its own, not ``w + offset`` in ``_fwd``: there numba's parallel pass would turn
# the array expression into a parallel loop, waking the thread pool for n additions (4 us of a
# 7 us token-sized call).
@njit(fastmath=_FASTMATH)
def _plus_offset(w, offset):
    out = np.empty(w.shape[0], dtype=w.dtype)
    for j in range(w.shape[0]):
        out[j] = w[j] + offset
    return out


@njit(fastmath=_FASTMATH, cache=True, parallel=True, nogil=True)
def _fwd(
    x_at, res_at, mask_at, h_at, w_at, b_at, out_at, mean_at, rstd_at, n_rows, n, eps, rms, store_stats, drop,
    x_kind, res_kind, mask_kind, h_kind, w_kind, out_kind, xhat_kind, rstd_kind, rows_per_block, pair_rows,
    hint_next_pair, w_offset,
):  # fmt: skip
    """Rows are independent: blocks of rows go to the threads (one block: no thread pool).

    A kind of None means the operand is absent: x (no residual add: h is the input), the
    residual, the mask output, the x-hat rounding, the rounding of rstd before it multiplies.
    ``drop`` is None or (threshold, scale, seed_lo, seed_hi). ``pair_rows``: rows go in pairs;
    ``hint_next_pair``: each pair hints the next pair's rows into cache (rows of up to
    ``_PREFETCH_PAIR_MAX_ROW_BYTES``). ``w_offset`` (eps's type) is added to the weight once, before
    the rows (Gemma's ``1 + w`` in inference; training passes the offset weight itself).
    """
    x = _opt_view(x_at, n_rows, n, x_kind)
    res = _opt_view(res_at, n_rows, n, res_kind)
    mask_out = _opt_view(mask_at, n_rows, n, mask_kind)
    h = _view(h_at, n_rows, n, h_kind)
    out = _view(out_at, n_rows, n, out_kind)
    xhat_like = _opt_view(0, 0, 0, xhat_kind)
    rstd_like = _opt_view(0, 0, 0, rstd_kind)
    mean = _view(mean_at, 1, n_rows, eps)[0]
    rstd = _view(rstd_at, 1, n_rows, eps)[0]
    w = _widen(_view(w_at, 1, n, w_kind), mean)
    if w_offset != 0:
        w = _plus_offset(w, w_offset)  # a new (n,) array: the weight itself is never written
    b = _widen(_view(b_at, 1, n, w_kind), mean)
    # only bf16/fp16 stores treat NaN apart (a float32/float64 store is exact either way)
    params_finite = out.itemsize > 2 or (_all_finite(w) and _all_finite(b))
    n_blocks = (n_rows + rows_per_block - 1) // rows_per_block
    if n_blocks == 1:
        # np.int64(0), not 0: a literal 0 would type r0 as Literal[int](0) and compile the row
        # code a second time for this call site (4 s a specialization, a quarter of the tests' time)
        _fwd_block(
            x, res, drop, mask_out, h, w, b, out, xhat_like, rstd_like, mean, rstd, eps, rms, store_stats,
            params_finite, pair_rows, hint_next_pair, np.int64(0), n_rows,
        )  # fmt: skip
    else:
        for k in prange(n_blocks):
            _fwd_block(
                x, res, drop, mask_out, h, w, b, out, xhat_like, rstd_like, mean, rstd, eps, rms, store_stats,
                params_finite, pair_rows, hint_next_pair, k * rows_per_block, min(n_rows, (k + 1) * rows_per_block),
            )  # fmt: skip


# Not inlined into ``_fwd``'s two call sites: one compiled copy of the row code per
# specialization halves its compile time, and the call costs once per block, not per row.
@njit(fastmath=_FASTMATH)
def _fwd_block(
    x, res, drop, mask_out, h, w, b, out, xhat_like, rstd_like, mean, rstd, eps, rms, store_stats, params_finite,
    pair_rows, hint_next_pair, r0, r1,
):  # fmt: skip
    prefer_vector_width(_ROW_LOOP_VECTOR_BITS)
    i = r0
    while i < r1:
        m1a, ca, ra = _fwd_row_stats(x, res, drop, mask_out, h, mean, rstd, eps, rms, store_stats, i)
        # (the saved rstd stays unrounded: the backward differentiates the formula with the
        # rounding taken as the identity, as autograd does a cast)
        ra = acc_scalar(h, round_as(rstd_like, ra))
        finite_a = params_finite and np.isfinite(m1a + ca) and np.isfinite(ra)
        if pair_rows and finite_a and i + 1 < r1:
            m1b, cb, rb = _fwd_row_stats(x, res, drop, mask_out, h, mean, rstd, eps, rms, store_stats, i + 1)
            rb = acc_scalar(h, round_as(rstd_like, rb))
            if np.isfinite(m1b + cb) and np.isfinite(rb):
                _fwd_row_pair_out(x, res, h, w, b, out, xhat_like, hint_next_pair, i, m1a, ca, ra, m1b, cb, rb)
                i += 2
                continue
        # one row: not pairing, the last of an odd count, or a row with a NaN or Inf (row i + 1
        # is then done again from the start, which gives the same values)
        _fwd_row_out(x, res, h, w, b, out, xhat_like, params_finite, i, m1a, ca, ra)
        i += 1


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_row_stats(dy, h, w, w_finite, mean, rstd, dh_out, rms, i):
    """Row i's backward statistics: (m, cm, r, mean_xhat_g, mean_g, not_nan).

    With ``g = dy * w``: m and r are the saved mean and rstd, cm = mean(h - m) corrects the
    fp32-rounded saved mean, mean_g = mean(g), mean_xhat_g = mean(xhat * g). not_nan: the
    statistics, weights and incoming residual gradient (a row of which is one cheap pass from
    L1 away) are finite, so no dh of the row can be NaN and the vectorizable store is exact.
    """
    n = h.shape[1]
    inv_n = acc_scalar(h, 1.0 / n)
    m = mean[i]
    r = rstd[i]
    sd = acc_scalar(h, 0.0)
    sdg = acc_scalar(h, 0.0)
    sg = acc_scalar(h, 0.0)
    for j in range(n):
        d = load(h, i, j) - m
        g = load(dy, i, j) * w[j]
        sd += d
        sdg += d * g
        sg += g
    # RMSNorm has no mean: nothing to correct and no mean(g) term.
    cm = acc_scalar(h, 0.0) if rms else sd * inv_n
    mean_g = acc_scalar(h, 0.0) if rms else sg * inv_n
    mean_xhat_g = r * (sdg - cm * sg) * inv_n
    not_nan = (
        w_finite and np.isfinite(m) and np.isfinite(r) and np.isfinite(mean_xhat_g + mean_g + cm)
        and _row_finite(dh_out, i)
    )  # fmt: skip
    return m, cm, r, mean_xhat_g, mean_g, not_nan


@njit(fastmath=_FASTMATH, inline="always")
def _dh(h, dy_v, h_v, w_v, m, cm, r, mean_xhat_g, mean_g):
    """The normalization's own gradient with respect to its input h (h_v an element of the array
    h, whose dtype picks the centring: ``_centred``), and x-hat: (dh, xhat)."""
    xhat = _centred(h, h_v, m, cm) * r
    return r * (dy_v * w_v - xhat * mean_xhat_g - mean_g), xhat


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_train_element(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, i, j, key, stats):
    """Element (i, j) of the training case in a row known not NaN: dx (and dres), dw and db terms."""
    m, cm, r, mean_xhat_g, mean_g, _ = stats
    dy_v = load(dy, i, j)
    d, xhat = _dh(h, dy_v, load(h, i, j), w[j], m, cm, r, mean_xhat_g, mean_g)
    dh = _plus(dh_out, d, i, j)
    _put_not_nan(dres, i, j, dh)
    _put_not_nan(dx, i, j, _dropped(drop, dh, _kept(drop, key, j)))
    dw_acc[j] += dy_v * xhat
    db_acc[j] += dy_v


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_dx_element(dy, h, w, dh_out, drop, dx, dres, i, j, key, stats):
    """Element (i, j) of dx (and dres) alone, in a row known not NaN."""
    m, cm, r, mean_xhat_g, mean_g, _ = stats
    dh = _plus(dh_out, _dh(h, load(dy, i, j), load(h, i, j), w[j], m, cm, r, mean_xhat_g, mean_g)[0], i, j)
    _put_not_nan(dres, i, j, dh)
    _put_not_nan(dx, i, j, _dropped(drop, dh, _kept(drop, key, j)))


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_row(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, need_d, need_dw, need_db, i, stats):
    """Row i alone: dx (and dres) from its statistics; dw_acc += dy * xhat, db_acc += dy."""
    n = h.shape[1]
    m, cm, r, mean_xhat_g, mean_g, not_nan = stats
    key = _row_key(drop, i)
    # Every element is loaded once, before any store: LLVM cannot know that dx aliases
    # nothing, and would load again after each store.
    if need_d and need_dw and need_db:
        # the training case: one branch-free loop for all the gradients
        if not_nan:
            ahead = i + 1 < h.shape[0]
            n_blocks = n // _BLOCK
            for k in range(n_blocks):
                j0 = k * _BLOCK
                if ahead:
                    _prefetch_bwd_row(dy, h, dh_out, dx, dres, i + 1, j0)
                for j in range(j0, j0 + _BLOCK):
                    _bwd_train_element(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, i, j, key, stats)
            for j in range(n_blocks * _BLOCK, n):
                _bwd_train_element(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, i, j, key, stats)
        else:
            for j in range(n):
                dy_v = load(dy, i, j)
                d, xhat = _dh(h, dy_v, load(h, i, j), w[j], m, cm, r, mean_xhat_g, mean_g)
                dh = _plus(dh_out, d, i, j)
                _put(dres, i, j, dh)
                _put(dx, i, j, _dropped(drop, dh, _kept(drop, key, j)))
                dw_acc[j] += dy_v * xhat
                db_acc[j] += dy_v
        return
    # otherwise one loop per gradient asked for, each branch-free so that it vectorizes
    if need_d:
        if not_nan:
            ahead = i + 1 < h.shape[0]
            n_blocks = n // _BLOCK
            for k in range(n_blocks):
                j0 = k * _BLOCK
                if ahead:
                    _prefetch_bwd_row(dy, h, dh_out, dx, dres, i + 1, j0)
                for j in range(j0, j0 + _BLOCK):
                    _bwd_dx_element(dy, h, w, dh_out, drop, dx, dres, i, j, key, stats)
            for j in range(n_blocks * _BLOCK, n):
                _bwd_dx_element(dy, h, w, dh_out, drop, dx, dres, i, j, key, stats)
        else:
            for j in range(n):
                d = _dh(h, load(dy, i, j), load(h, i, j), w[j], m, cm, r, mean_xhat_g, mean_g)[0]
                dh = _plus(dh_out, d, i, j)
                _put(dres, i, j, dh)
                _put(dx, i, j, _dropped(drop, dh, _kept(drop, key, j)))
    if need_dw:
        for j in range(n):
            dw_acc[j] += load(dy, i, j) * (_centred(h, load(h, i, j), m, cm) * r)
    if need_db:
        for j in range(n):
            db_acc[j] += load(dy, i, j)


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_row_pair(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, hint_next_pair, i, stats_a, stats_b):
    """Rows i and i + 1 of the training case, both not NaN, in one sweep.

    dw_acc and db_acc are read and written once for the two rows: in the one-row loop those
    accesses are half of the loop's memory operations.
    """
    n = h.shape[1]
    key_a = _row_key(drop, i)
    key_b = _row_key(drop, i + 1)
    ahead = hint_next_pair and i + 3 < h.shape[0]
    n_blocks = n // _BLOCK
    for k in range(n_blocks):
        j0 = k * _BLOCK
        if ahead:
            _prefetch_bwd_row(dy, h, dh_out, dx, dres, i + 2, j0)
            _prefetch_bwd_row(dy, h, dh_out, dx, dres, i + 3, j0)
        for j in range(j0, j0 + _BLOCK):
            _bwd_pair_element(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, i, j, key_a, key_b, stats_a, stats_b)
    for j in range(n_blocks * _BLOCK, n):
        _bwd_pair_element(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, i, j, key_a, key_b, stats_a, stats_b)


@njit(fastmath=_FASTMATH, inline="always")
def _bwd_pair_element(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, i, j, key_a, key_b, stats_a, stats_b):
    """Element j of rows i and i + 1 (see ``_bwd_row_pair``)."""
    ma, cma, ra, mean_xhat_ga, mean_ga, _ = stats_a
    mb, cmb, rb, mean_xhat_gb, mean_gb, _ = stats_b
    w_v = w[j]
    dy_a = load(dy, i, j)
    dy_b = load(dy, i + 1, j)
    d_a, xhat_a = _dh(h, dy_a, load(h, i, j), w_v, ma, cma, ra, mean_xhat_ga, mean_ga)
    d_b, xhat_b = _dh(h, dy_b, load(h, i + 1, j), w_v, mb, cmb, rb, mean_xhat_gb, mean_gb)
    dh_a = _plus(dh_out, d_a, i, j)
    dh_b = _plus(dh_out, d_b, i + 1, j)
    _put_not_nan(dres, i, j, dh_a)
    _put_not_nan(dres, i + 1, j, dh_b)
    _put_not_nan(dx, i, j, _dropped(drop, dh_a, _kept(drop, key_a, j)))
    _put_not_nan(dx, i + 1, j, _dropped(drop, dh_b, _kept(drop, key_b, j)))
    dw_acc[j] += dy_a * xhat_a + dy_b * xhat_b
    db_acc[j] += dy_a + dy_b


# Not inlined into ``_bwd``'s two call sites (compile time); called once per chunk of rows.
@njit(fastmath=_FASTMATH)
def _bwd_rows(
    dy, h, w, w_finite, mean, rstd, dh_out, drop, dx, dres, dw_acc, db_acc, rms, need_dw, need_db, pair_rows,
    hint_next_pair, r0, r1,
):  # fmt: skip
    """Rows [r0, r1): write dx (and dres), set dw_acc, db_acc to the chunk's sums of dy*xhat and dy.

    With a residual add, the input's gradient is ``dh = (norm's gradient) + dh_out`` (the
    gradient arriving at the residual output): dres gets dh, dx gets dropout(dh) with the
    forward's mask. Without one, dx gets the norm's gradient (dh_out, dres and drop are None).
    With ``pair_rows``, training (every gradient asked for) takes rows in pairs, each pair's
    terms added to the sums together; the pairing is fixed by the chunk and the values, so the
    sums stay bitwise the same whatever the thread count. ``hint_next_pair``: each pair hints the
    next pair's rows into cache (rows of up to ``_PREFETCH_PAIR_MAX_ROW_BYTES``).
    """
    prefer_vector_width(_ROW_LOOP_VECTOR_BITS)
    need_d = not (_is_none_value(dx) and _is_none_value(dres))
    training = pair_rows and need_d and need_dw and need_db
    dw_acc[:] = 0
    db_acc[:] = 0
    i = r0
    while i < r1:
        stats_a = _bwd_row_stats(dy, h, w, w_finite, mean, rstd, dh_out, rms, i)
        if training and i + 1 < r1 and stats_a[5]:
            stats_b = _bwd_row_stats(dy, h, w, w_finite, mean, rstd, dh_out, rms, i + 1)
            if stats_b[5]:
                _bwd_row_pair(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, hint_next_pair, i, stats_a, stats_b)
                i += 2
                continue
        # one row: the last of an odd count, a row with a NaN or Inf (row i + 1 then pairs with
        # i + 2: the pairing depends on the values, never on the threads), or not training
        _bwd_row(dy, h, w, dh_out, drop, dx, dres, dw_acc, db_acc, need_d, need_dw, need_db, i, stats_a)
        i += 1


def _is_none_value(t):
    """Whether t is None, decided at compile time."""


@overload(_is_none_value, inline="always")
def _is_none_value_overload(t):
    if _is_none(t):
        return lambda t: True
    return lambda t: False


@njit(fastmath=_FASTMATH, cache=True, parallel=True, nogil=True)
def _bwd(
    dy_at, h_at, w_at, mean_at, rstd_at, dh_out_at, dx_at, dres_at, dw_part_at, db_part_at, dw_at, db_at, n_rows, n,
    rms, need_dw, need_db, pair_rows, hint_next_pair, drop, rows_per_chunk, n_chunks,
    dy_kind, h_kind, w_kind, acc_kind, dh_out_kind, dx_kind, dres_kind, parallel,
):  # fmt: skip
    """Chunk k of rows_per_chunk rows writes row k of the partial sums of dw and db; chunks in parallel.
    Then dw and db (at dw_at, db_at) are the partial rows summed in chunk order; a partial row at
    the address of its total (one chunk) is the total already.

    A kind of None means the operand is absent (dh_out, dx, dres); ``drop`` as in ``_fwd``.
    """
    dy = _view(dy_at, n_rows, n, dy_kind)
    h = _view(h_at, n_rows, n, h_kind)
    dh_out = _opt_view(dh_out_at, n_rows, n, dh_out_kind)
    dx = _opt_view(dx_at, n_rows, n, dx_kind)
    dres = _opt_view(dres_at, n_rows, n, dres_kind)
    mean = _view(mean_at, 1, n_rows, acc_kind)[0]
    rstd = _view(rstd_at, 1, n_rows, acc_kind)[0]
    w = _widen(_view(w_at, 1, n, w_kind), mean)
    w_finite = dy.itemsize > 2 or _all_finite(w)
    dw_part = _view(dw_part_at, n_chunks, n if need_dw else 0, acc_kind)
    db_part = _view(db_part_at, n_chunks, n if need_db else 0, acc_kind)
    if not parallel:
        # small: the same chunks in order on this thread, no thread pool
        for k in range(n_chunks):
            r0 = k * rows_per_chunk
            _bwd_rows(
                dy, h, w, w_finite, mean, rstd, dh_out, drop, dx, dres, dw_part[k], db_part[k],
                rms, need_dw, need_db, pair_rows, hint_next_pair, r0, min(n_rows, r0 + rows_per_chunk),
            )  # fmt: skip
    else:
        for k in prange(n_chunks):
            r0 = k * rows_per_chunk
            r1 = min(n_rows, r0 + rows_per_chunk)
            _bwd_rows(
                dy, h, w, w_finite, mean, rstd, dh_out, drop, dx, dres, dw_part[k], db_part[k],
                rms, need_dw, need_db, pair_rows, hint_next_pair, r0, r1,
            )  # fmt: skip
    # The sums in this kernel, not in one of their own: once a large kernel has emptied the
    # caches, each further kernel call and its output's allocation cost tens of microseconds.
    # On this thread: the partial rows hold at most about _PARTIAL_SUM_ELEMENTS + n elements.
    if need_dw and dw_part_at != dw_at:
        _sum_chunks(dw_part, _view(dw_at, 1, n, acc_kind)[0])
    if need_db and db_part_at != db_at:
        _sum_chunks(db_part, _view(db_at, 1, n, acc_kind)[0])


@njit
def _sum_chunks(part, out):
    """out[j] = part[0, j] + part[1, j] + ... in chunk order (fixed, whatever the thread count)."""
    first = part[0]
    for j in range(out.shape[0]):
        out[j] = first[j]
    for k in range(1, part.shape[0]):
        row = part[k]
        for j in range(out.shape[0]):
            out[j] += row[j]


# --- kernels compiled in this process are reloaded from numba's cache ------------------------
# A kernel compiled in the running process was measured here to run slower, for the life of
# that process, than the same kernel loaded from numba's on-disk cache by a fresh process (the
# backward at 1024x4096 fp32: 3.5-4.8 ms as compiled, 1.7-2.7 ms loaded; one thread or two;
# numba issue #10617 reports it for parallel code). Dropping the in-process code once numba has
# saved it, so that the next call loads the kernel from the cache, recovers part of that (3.1-3.3
# ms in the same process); the rest of the cause is not known. Without a working cache a
# signature would compile again: the second compile of one turns this off for the process.


class _CompileWatch(numba_event.Listener):
    """Notes each compile of a cached kernel; ``reload_due`` tells ``_EntryPoints`` to reload after the call."""

    def __init__(self) -> None:
        self.kernels: tuple = ()
        self.compiled: set = set()
        self.enabled = hasattr(_fwd, "_reset_overloads")  # a numba internal: used only if present
        self.reload_due = False

    def on_start(self, event) -> None:
        pass

    def on_end(self, event) -> None:
        dispatcher = event.data["dispatcher"]
        if dispatcher not in self.kernels:
            return
        key = (dispatcher, tuple(event.data["args"]))
        if key in self.compiled:
            self.enabled = False  # compiled twice: the cache does not keep it
        self.compiled.add(key)
        self.reload_due = self.enabled

    def reload(self) -> None:
        """Drop the kernels' compiled code: each next call loads its signature from the cache.

        Not while other Python threads live: the kernels release the GIL, and one of them could
        be running the code this would drop. Such a process keeps the code it compiled.
        """
        self.reload_due = False
        if threading.active_count() > 1:
            return
        for entries in _EntryPoints.all:
            entries.forget()
        for dispatcher in self.kernels:
            dispatcher._reset_overloads()


_compile_watch = _CompileWatch()
numba_event.register("numba:compile", _compile_watch)


class _EntryPoints(dict):
    """A kernel's compiled entry points by key, called past numba's dispatcher.

    numba's dispatcher finds the signature of every call from its arguments' types, about 1 us
    for ``_fwd``'s 24 (as much as the kernel itself on a 4096-feature token). The launchers know
    the signature already: each looks up a key (the operands' dtypes and which are absent, what
    fixes every argument's numba type) and calls what it finds. A key not seen yet gives a call
    through the dispatcher (compiling or loading from the cache), which then keeps that
    signature's entry point under the key. A kernel compiled in this process is reloaded first
    (``_CompileWatch``), and its entry points are forgotten with it.
    """

    all: list[_EntryPoints] = []

    def __init__(self, dispatcher) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.checked: dict = {}  # key: (signature, entry point), for check_keys
        _EntryPoints.all.append(self)

    def __missing__(self, key):
        return functools.partial(self._checked_call if _EntryPoints.check_keys else self._first_call, key)

    def _signature(self, args) -> tuple:
        return tuple(self.dispatcher.typeof_pyval(a) for a in args)

    def _through_dispatcher(self, args, signature=None):
        """Call through the dispatcher; then the signature's entry point, or None where there is
        none to keep (the kernel was just compiled, and reloaded)."""
        self.dispatcher(*args)
        if _compile_watch.reload_due:
            _compile_watch.reload()
            return None
        compiled = self.dispatcher.overloads.get(signature or self._signature(args))
        return compiled.entry_point if compiled is not None else None

    def _first_call(self, key, *args) -> None:
        entry = self._through_dispatcher(args)
        if entry is not None:
            self[key] = entry

    # A key that missed an operand's dtype would call one signature's code with another's
    # arguments. With NORMFUSE_CHECK_KERNEL_KEYS=1 (the test suite sets it) no entry point is
    # kept in the dict itself: every call comes here, its signature is found from its arguments
    # and must be the one its key stood for before, and the kept entry point is called.
    check_keys = os.environ.get("NORMFUSE_CHECK_KERNEL_KEYS") == "1"

    def _checked_call(self, key, *args) -> None:
        signature = self._signature(args)
        seen = self.checked.get(key)
        if seen is not None:
            if seen[0] != signature:
                raise AssertionError(f"{self.dispatcher.__name__}: key {key} stands for {seen[0]} and {signature}")
            seen[1](*args)
            return
        entry = self._through_dispatcher(args, signature)
        if entry is not None:
            self.checked[key] = (signature, entry)

    def forget(self) -> None:
        self.clear()
        self.checked.clear()


# The partial sums of dweight (and of dbias) each hold at most about this many elements (unless
# that leaves under 16 rows a chunk): each partial row is written by one core and read again by
# the fixed-order sum, most of them from the other core's cache.
# 1 << 17 against no limit, in a training step's backward (1024x4096 and 256x16384 fp32): the
# sums 0.13-0.15 ms -> 0.04 ms a call, two calls a backward; 1 << 16 gained 0.02 ms more but
# leaves 256x16384 four chunks, too few for the threads of a larger machine.
_PARTIAL_SUM_ELEMENTS = 1 << 17


def rows_per_chunk(n_rows: int, n: int) -> int:
    """Rows per dweight/dbias partial sum: a function of the shape only, never of threads.

    At least 16 rows and at most 128 chunks; wide rows take fewer, longer chunks. Even, so
    that training's row pairs fill every chunk but the last.
    """
    rows = max(16, -(-n_rows // 128), -(-n_rows * n // _PARTIAL_SUM_ELEMENTS))
    return rows + (rows & 1)


# numba element type of each torch dtype: bf16 and fp16 travel as their bits
_KIND = {
    torch.float32: np.float32(0),
    torch.float64: np.float64(0),
    torch.bfloat16: np.uint16(0),
    torch.float16: np.int16(0),
}


@functools.lru_cache(maxsize=64)
def _filled(n: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    """Ones for a missing weight, zeros for a missing bias (read-only, cached per size)."""
    return torch.full((n,), value, dtype=dtype)


def _param(p: torch.Tensor | None, n: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
    if p is None:
        return _filled(n, fill, dtype)
    return p if p.is_contiguous() else p.contiguous()


def _rows_per_block(n_rows: int, n: int) -> int:
    if not _use_threads(n_rows * n):
        return n_rows
    # blocks of about 64 KiB of fp32 keep the scheduler's overhead small and balance well;
    # rows that go in pairs (``_PAIR_MIN_FEATURES``) come in blocks of an even count
    rows = max(1, min(64, (1 << 14) // n))
    return rows if n < _PAIR_MIN_FEATURES else max(2, rows + (rows & 1))


def _kind(t: torch.Tensor | torch.dtype | None):
    """The numba element type standing for a tensor's (or a dtype's) storage; None stays None."""
    if t is None:
        return None
    return _KIND[t if isinstance(t, torch.dtype) else t.dtype]


def _drop_state(dropout_p: float, seed: int, acc: torch.dtype):
    """The kernels' ``drop`` operand: None without dropout, else (threshold, scale, seed_lo, seed_hi)."""
    if dropout_p <= 0.0:
        return None
    lo, hi = _dropout.split_seed(int(seed))
    scale = _dropout.scale(dropout_p)
    return (
        np.uint64(_dropout.threshold(dropout_p)), np.float64(scale) if acc == torch.float64 else np.float32(scale),
        np.uint64(lo), np.uint64(hi),
    )  # fmt: skip


def _launch_fwd(
    x, out, mean, rstd, weight, bias, n_rows, n, eps, rms, xhat_dtype=None, add=None, rstd_dtype=None, weight_offset=0.0
):  # fmt: skip
    """``add`` is None (plain norm of x) or (residual or None, h, mask or None, drop state)."""
    # Lean on purpose: on a token-sized input this function is most of the op's latency.
    if weight is not None and bias is not None and weight.is_contiguous() and bias.is_contiguous():
        w, b = weight, bias  # same dtype: the front end guarantees it when both are given
    else:
        param_dtype = weight.dtype if weight is not None else bias.dtype if bias is not None else acc_dtype(x.dtype)
        w = _param(weight, n, 1.0, param_dtype)
        b = _param(bias, n, 0.0, param_dtype)
    if mean is None:
        mean_at = rstd_at = 0
        store_stats = False
    else:
        mean_at, rstd_at = mean.data_ptr(), rstd.data_ptr()
        store_stats = True
    out_dtype = out.dtype
    if add is None:
        x_at = res_at = mask_at = 0
        h_at = x.data_ptr()
        x_kind = res_kind = mask_kind = drop = None
        h_dtype = x.dtype
        key = (h_dtype, w.dtype, out_dtype, xhat_dtype, rstd_dtype)
    else:
        residual, h, mask, drop = add
        x_at, x_kind = x.data_ptr(), _KIND[x.dtype]
        res_at, res_kind = (residual.data_ptr(), _KIND[residual.dtype]) if residual is not None else (0, None)
        mask_at, mask_kind = (mask.data_ptr(), np.uint8(0)) if mask is not None else (0, None)
        h_at, h_dtype = h.data_ptr(), h.dtype
        key = (h_dtype, w.dtype, out_dtype, xhat_dtype, rstd_dtype, x.dtype,
               residual.dtype if residual is not None else None, mask is None, drop is None)  # fmt: skip
    _fwd_kernel[key](
        x_at, res_at, mask_at, h_at, w.data_ptr(), b.data_ptr(), out.data_ptr(), mean_at, rstd_at, n_rows, n,
        _eps_scalar(eps, x.dtype is torch.float64), bool(rms), store_stats, drop, x_kind, res_kind, mask_kind,
        _KIND[h_dtype], _KIND[w.dtype], _KIND[out_dtype], _kind(xhat_dtype), _kind(rstd_dtype),
        _rows_per_block(n_rows, n),
        n >= _PAIR_MIN_FEATURES, n * h_dtype.itemsize <= _PREFETCH_PAIR_MAX_ROW_BYTES,
        _eps_scalar(weight_offset, x.dtype is torch.float64),
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _eps_scalar(eps: float, f64: bool):
    """eps as the kernels' numpy scalar (float32; float64 for float64 input), made once per
    value: ``np.float32(eps)`` alone costs half a microsecond."""
    return np.float64(eps) if f64 else np.float32(eps)


def norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    *,
    residual: torch.Tensor | None = None,
    residual_out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    return_mask: bool = False,
    xhat_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward of LayerNorm (or RMSNorm when ``rms``) over the last dim of a 2-D tensor.

    x: (M, N) row-major, float32/float64/bfloat16/float16. weight, bias: (N,) in x's dtype or
    float32, or None.

    Plain norm (``residual_out_dtype`` None): normalizes x. Residual add (``residual_out_dtype``
    given): ``h = dropout(x) + residual`` (residual (M, N) or None) is computed, rounded to
    ``residual_out_dtype``, returned as ``residual_out`` and normalized. Dropout drops with
    probability ``dropout_p`` by the hash of ``seed`` and the element's position (see
    ``normfuse._dropout``); ``return_mask`` also returns the (M, N) bool keep-mask.

    ``xhat_dtype`` rounds x-hat to that dtype before the weight multiply (Llama-style models);
    ``rstd_dtype`` rounds rstd to that dtype before it multiplies the centred row (the saved
    rstd is not rounded); ``out_dtype`` (default: x's dtype) is the output's dtype.

    Returns out (M, N), residual_out (M, N) or None, mean and rstd (M,) in the accumulation
    dtype (float64 for float64 input, else float32; mean is 0 for ``rms``), the mask or None.
    """
    n_rows, n = x.shape
    add = residual_out_dtype is not None
    drop = _drop_state(dropout_p, seed, acc_dtype(residual_out_dtype)) if add else None
    out, h, mask, mean, rstd = fwd_buffers(x, residual_out_dtype, drop is not None, return_mask, out_dtype)
    if n_rows == 0 or n == 0:
        return out, h, mean, rstd, mask
    extra = (residual, h, mask if drop is not None else None, drop) if add else None
    _launch_fwd(x, out, mean, rstd, weight, bias, n_rows, n, eps, rms, xhat_dtype, extra, rstd_dtype)
    return out, h, mean, rstd, mask


def norm_fwd_inference(
    x: torch.Tensor,
    n_rows: int,
    n: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    xhat_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> torch.Tensor:
    """The plain forward's output alone, in x's shape, for a row-major x of n_rows rows of n; nothing saved.

    ``weight_offset`` (CPU only, with a weight): the scale is ``weight_offset + weight``, formed in
    the accumulation dtype, as the front end's ``weight.to(acc) + weight_offset`` would be."""
    out = torch.empty_like(x) if out_dtype is None else torch.empty_like(x, dtype=out_dtype)
    if n_rows and n:
        _launch_fwd(x, out, None, None, weight, bias, n_rows, n, eps, rms, xhat_dtype, None, rstd_dtype, weight_offset)
    return out


def add_norm_fwd_inference(
    x: torch.Tensor,
    residual: torch.Tensor,
    n_rows: int,
    n: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    xhat_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    rstd_dtype: torch.dtype | None = None,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, residual_out) of the add+norm forward without dropout, in x's shape, for row-major x
    and residual of n_rows rows of n in one dtype; nothing saved. ``weight_offset``: as
    ``norm_fwd_inference``."""
    out = torch.empty_like(x) if out_dtype is None else torch.empty_like(x, dtype=out_dtype)
    h = torch.empty_like(x)
    if n_rows and n:
        _launch_fwd(x, out, None, None, weight, bias, n_rows, n, eps, rms, xhat_dtype, (residual, h, None, None),
                    rstd_dtype, weight_offset)  # fmt: skip
    return out, h


def norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    need_dx: bool,
    need_dweight: bool,
    need_dbias: bool,
    *,
    add: bool = False,
    dresidual_out: torch.Tensor | None = None,
    need_dresidual: bool = False,
    x_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    dweight_dtype: torch.dtype | None = None,
    dbias_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Fused backward: (dx, dresidual, dweight, dbias); gradients not asked for are None.

    dy: (M, N) gradient of the output (its dtype). h: (M, N) row-major, the normalized input
    (x itself, or the residual output when ``add``). mean, rstd: what ``norm_fwd`` returned.
    dweight and dbias (N,) are summed in the accumulation dtype and come in it, or rounded once
    to ``dweight_dtype`` / ``dbias_dtype`` where given (the parameters' dtypes).

    With ``add``: ``dh = (norm's gradient) + dresidual_out`` (None: nothing arrived there);
    dresidual = dh in ``residual_dtype``, dx = dropout(dh) with the forward's mask (same
    ``dropout_p`` and ``seed``) in ``x_dtype``. Without: dx in h's dtype.
    """
    n_rows, n = h.shape
    acc = acc_dtype(h.dtype)
    dx, dres = bwd_buffers(h, add, need_dx, need_dresidual, x_dtype, residual_dtype)
    if n_rows == 0 or n == 0:
        dweight, dbias = sums_over_no_rows(n, acc, h.device, need_dweight, need_dbias)
        return dx, dres, rounded(dweight, dweight_dtype), rounded(dbias, dbias_dtype)
    w = _param(weight, n, 1.0, acc)
    chunk = rows_per_chunk(n_rows, n)
    n_chunks = -(-n_rows // chunk)
    dweight = torch.empty(n, dtype=acc) if need_dweight else None
    dbias = torch.empty(n, dtype=acc) if need_dbias else None
    dw_at = dweight.data_ptr() if need_dweight else 0
    db_at = dbias.data_ptr() if need_dbias else 0
    if n_chunks == 1:
        # one chunk: its partial row is the total
        dw_part_at, db_part_at = dw_at, db_at
    else:
        # one partial row per chunk, dw's and db's in one allocation (each costs, see _bwd)
        parts = torch.empty((int(need_dweight) + int(need_dbias), n_chunks, n), dtype=acc)
        dw_part_at = parts.data_ptr() if need_dweight else 0
        db_part_at = parts.data_ptr() + (n_chunks * n * parts.itemsize if need_dweight else 0) if need_dbias else 0
    dh_out = dresidual_out if add else None
    if dh_out is not None and not dh_out.is_contiguous():
        dh_out = dh_out.contiguous()
    drop = _drop_state(dropout_p, seed, acc) if add else None
    parallel = _use_threads(n_rows * n)
    key = (dy.dtype, h.dtype, w.dtype, None if dh_out is None else dh_out.dtype, None if dx is None else dx.dtype,
           None if dres is None else dres.dtype, drop is None)  # fmt: skip
    _bwd_kernel[key](
        dy.data_ptr(), h.data_ptr(), w.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        dh_out.data_ptr() if dh_out is not None else 0,
        dx.data_ptr() if dx is not None else 0, dres.data_ptr() if dres is not None else 0,
        dw_part_at, db_part_at, dw_at, db_at,
        n_rows, n, bool(rms), bool(need_dweight), bool(need_dbias), n >= _PAIR_MIN_FEATURES,
        n * h.itemsize <= _PREFETCH_PAIR_MAX_ROW_BYTES, drop, chunk, n_chunks,
        _KIND[dy.dtype], _KIND[h.dtype], _KIND[w.dtype], _KIND[acc],
        _kind(dh_out), _kind(dx), _kind(dres), parallel,
    )  # fmt: skip
    return dx, dres, rounded(dweight, dweight_dtype), rounded(dbias, dbias_dtype)


_compile_watch.kernels = (_fwd, _bwd)
_fwd_kernel = _EntryPoints(_fwd)
_bwd_kernel = _EntryPoints(_bwd)
