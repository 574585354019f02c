"""Host (CPU-side) cost of one call at each layer of the stack, on tensors too small for the GPU to matter.

    python benchmarks/host_overhead.py [--rows 8] [--n 1024] [--profile]

On a GPU, a call whose kernels take less time than the host needs to issue them is timed by
the host: at 32 MiB a LayerNorm forward moves its bytes in about 20 us, a forward+backward in
about 50 us, so any layer of Python above that shows up directly in the GB/s of
``bench_gpu.py``. Each row is the median over 5 repetitions of ``iters`` back-to-back calls
followed by one synchronize: on tiny tensors that is the host's time per call. Rows go from the
whole public call down to a bare Triton launch, so the differences say where the time goes.
``--profile`` adds a cProfile of normfuse's forward+backward (top functions by own time).

The last rows ask where a Python autograd op's backward loses its time: autograd runs the
backward of a CUDA op on its own worker thread, so a Triton launch (or a torch kernel) is timed
there, in a plain Python thread, and with ``torch.autograd.set_multithreading_enabled(False)``
(the backward on the calling thread).
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import normfuse
from normfuse.backends import triton as tb
from normfuse.cli.bench import AutogradFloor


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call_us(fn, iters: int = 300) -> float:
    for _ in range(20):
        fn()
    _sync()
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync()
        samples.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(samples)


class _BwdLaunches(torch.autograd.Function):
    """The floor plus one launch in the backward: ``launch`` (a Triton kernel or a torch one)."""

    @staticmethod
    def forward(ctx, x, w, b, launch):
        ctx.save_for_backward(x, w)
        ctx.launch = launch
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        ctx.launch()
        return torch.empty_like(x), torch.empty_like(w), torch.empty_like(w), None


def _in_thread(fn) -> float:
    """per_call_us(fn) measured inside a fresh Python thread."""
    import threading

    result = []
    thread = threading.Thread(target=lambda: result.append(per_call_us(fn)))
    thread.start()
    thread.join()
    return result[0]


def _fwd_launch_args(x, w, b, out):
    """_fwd_rows' arguments for a plain LayerNorm forward without saved statistics, as _launch_fwd builds them."""
    rows, n = x.shape
    block_m, block_n, warps = tb._fwd_config(n, x.element_size())
    ptrs = (x, x, x, x, w, b, out, x, x)
    scalars = (rows, n, 1e-5, 0, 0, 0, 0.0)
    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, HAS_W=True, HAS_B=True, RMS=False, STORE_STATS=False,
                  ADD=False, HAS_RES=False, DROPOUT=False, STORE_MASK=False, XHAT=None, ACC=tb._tl_acc(x.dtype))  # fmt: skip
    grid = (tb.triton.cdiv(rows, block_m),)
    return ptrs + scalars, consts, grid, warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    # without a GPU (TRITON_INTERPRET=1, CPU tensors) this is only a smoke test of the script
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = args.n
    x = torch.randn(args.rows, n, device=dev, dtype=dtype)
    w = torch.ones(n, device=dev, dtype=dtype)
    b = torch.zeros(n, device=dev, dtype=dtype)
    dy = torch.randn_like(x)
    buf = torch.empty_like(x)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    print(f"host time per call, {args.rows}x{n} {args.dtype}, {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, triton {tb.triton.__version__}, normfuse {normfuse.__version__}")  # fmt: skip

    def torch_fb():
        return torch.autograd.grad(F.layer_norm(xg, (n,), wg, bg), (xg, wg, bg), dy)

    def normfuse_fb():
        return torch.autograd.grad(normfuse.layer_norm(xg, (n,), wg, bg), (xg, wg, bg), dy)

    def backend_fb():
        out, _, mean, rstd, _ = tb.norm_fwd(x, w, b, 1e-5, False)
        return tb.norm_bwd(dy, x, w, mean, rstd, False, True, True, True)

    _, _, mean, rstd, _ = tb.norm_fwd(x, w, b, 1e-5, False)
    launch_args, consts, grid, warps = _fwd_launch_args(x, w, b, buf)
    rows = {
        "torch.empty_like": lambda: torch.empty_like(x),
        "copy_ (one torch kernel)": lambda: buf.copy_(x),
        "F.layer_norm fwd": lambda: F.layer_norm(x, (n,), w, b),
        "normfuse.layer_norm fwd": lambda: normfuse.layer_norm(x, (n,), w, b),
        "triton backend norm_fwd_inference": lambda: tb.norm_fwd_inference(x, args.rows, n, w, b, 1e-5, False),
        "bare _fwd_rows[grid](...)": lambda: tb._fwd_rows[grid](*launch_args, num_warps=warps, **consts),
        "F.layer_norm f+b (autograd.grad)": torch_fb,
        "normfuse.layer_norm f+b (autograd.grad)": normfuse_fb,
        "empty autograd.Function f+b (the floor)": lambda: torch.autograd.grad(
            AutogradFloor.apply(xg, wg, bg), (xg, wg, bg), dy
        ),
        "triton backend norm_fwd + norm_bwd": backend_fb,
        "triton backend norm_bwd": lambda: tb.norm_bwd(dy, x, w, mean, rstd, False, True, True, True),
        "dweight.to(bf16) (one cast)": lambda: mean.to(torch.bfloat16),
    }
    try:  # relaunching the compiled kernel skips Triton's argument binding and cache lookup
        compiled = tb._fwd_rows[grid](*launch_args, num_warps=warps, **consts)
        bound = inspect.signature(tb._fwd_rows.fn).bind(*launch_args, **consts)
        all_args = list(bound.arguments.values())
        grid3 = (grid[0], 1, 1)
        check = torch.empty_like(buf)
        rerun = compiled[grid3]
        ptr_args = list(all_args)
        ptr_args[6] = check
        rerun(*ptr_args)
        _sync()
        print(f"compiled-kernel relaunch gives the same output: {torch.equal(check, buf)}")
        rows["compiled kernel relaunch"] = lambda: rerun(*all_args)
    except Exception as error:  # noqa: BLE001 - a probe of Triton internals; report and go on
        print(f"compiled-kernel relaunch not available: {error!r}"[:300])
    bare = rows["bare _fwd_rows[grid](...)"]
    rows["floor + one Triton launch in backward"] = lambda: torch.autograd.grad(
        _BwdLaunches.apply(xg, wg, bg, bare), (xg, wg, bg), dy)  # fmt: skip
    rows["floor + one torch copy_ in backward"] = lambda: torch.autograd.grad(
        _BwdLaunches.apply(xg, wg, bg, lambda: buf.copy_(x)), (xg, wg, bg), dy)  # fmt: skip

    def single_threaded(fn):
        def call():
            with torch.autograd.set_multithreading_enabled(False):
                return fn()

        return call

    rows["normfuse f+b, autograd single-threaded"] = single_threaded(normfuse_fb)
    rows["floor, autograd single-threaded"] = single_threaded(rows["empty autograd.Function f+b (the floor)"])
    rows["floor + Triton launch, single-threaded"] = single_threaded(rows["floor + one Triton launch in backward"])
    rows["F.layer_norm f+b, single-threaded"] = single_threaded(torch_fb)
    width = max(len(k) for k in rows) + 2
    for name, fn in rows.items():
        print(f"  {name:<{width}}  {per_call_us(fn):8.1f} us")
    if dev == "cuda":
        print(f"  {'bare Triton launch, in a Python thread':<{width}}  {_in_thread(bare):8.1f} us")
        print(f"  {'normfuse f+b, in a Python thread':<{width}}  {_in_thread(normfuse_fb):8.1f} us")
    if args.profile:
        for label, fn in (("autograd's worker thread", normfuse_fb), ("single-threaded", single_threaded(normfuse_fb))):
            print(f"normfuse f+b, backward on {label}:")
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(500):
                fn()
            _sync()
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
