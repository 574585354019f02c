"""Is a call host-bound or GPU-bound? Host issue time, GPU time and do_bench time side by side.

    python benchmarks/fb_timeline.py [--op layer_norm] [--shapes 32:bfloat16:1024 256:float32:16384 ...] [--kernels]

For each contender of ``bench_gpu.py`` (normfuse, torch, torch.compile, Liger-Kernel) and mode
(fwd, f+b), three numbers in microseconds per call:

- ``host``: the time Python takes to issue one call while the GPU is held busy by a spin kernel
  (``torch.cuda._sleep``), so that nothing the host does waits for the GPU;
- ``gpu``: the GPU's own time per call, every call queued behind the spin kernel and run back to
  back, each after an L2 flush as in ``do_bench`` (the flush's own time measured alone and taken
  off);
- ``bench``: ``triton.testing.do_bench``'s median, the figure ``bench_gpu.py`` reports.

``bench`` near ``host`` and above ``gpu``: the call waits for its host. ``--kernels`` adds a
torch.profiler list of normfuse's GPU kernels per call with their mean durations.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from triton.testing import do_bench

from bench_gpu import _liger
from normfuse.cli.bench import contenders, implementations

CALLS = 20
# a spin long enough to cover the host's issue of CALLS calls of a few hundred microseconds
SPIN_CYCLES = 60_000_000


def _flush(cache: torch.Tensor) -> None:
    cache.zero_()


def host_and_gpu_us(fn, cache: torch.Tensor) -> tuple[float, float]:
    """(host issue time, GPU time) per call, medians over 5 rounds."""
    hosts, gpus = [], []
    for _ in range(5):
        times = []
        for with_fn in (False, True):
            torch.cuda.synchronize()
            torch.cuda._sleep(SPIN_CYCLES)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            for _ in range(CALLS):
                _flush(cache)
                if with_fn:
                    fn()
            t1 = time.perf_counter()
            end.record()
            torch.cuda.synchronize()
            times.append((start.elapsed_time(end) * 1e3 / CALLS, (t1 - t0) * 1e6 / CALLS))
        (flush_gpu, flush_host), (both_gpu, both_host) = times
        hosts.append(both_host - flush_host)
        gpus.append(both_gpu - flush_gpu)
    return statistics.median(hosts), statistics.median(gpus)


def kernel_list(fn) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    for event in prof.key_averages():
        total = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if total > 0:
            print(f"      {event.key[:70]:<70} {event.count / CALLS:4.1f}x per call, {total / event.count:8.1f} us each")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="layer_norm")
    parser.add_argument("--shapes", nargs="*", default=["32:bfloat16:1024", "256:bfloat16:256", "256:float32:4096",
                                                          "256:float32:16384"])  # fmt: skip
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    impls = implementations(args.op, compiled=not args.no_compile)
    liger = _liger(args.op)
    if liger is not None:
        impls["liger"] = liger
    cache = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    print(f"{args.op} on {torch.cuda.get_device_name()}, torch {torch.__version__}; us per call")
    print(f"{'shape':<22} {'contender':<18} {'host':>7} {'gpu':>7} {'bench':>7}")
    for shape in args.shapes:
        mib, dtype_name, n = shape.split(":")
        dtype, n = getattr(torch, dtype_name), int(n)
        rows = int(mib) * 2**20 // (n * torch.finfo(dtype).bits // 8)
        calls = contenders(args.op, rows, n, dtype, "cuda", impls)
        for mode in ("fwd", "f+b"):
            for impl in impls:
                fn = calls[f"{impl} {mode}"]
                bench = do_bench(fn, return_mode="median") * 1e3
                host, gpu = host_and_gpu_us(fn, cache)
                print(f"{shape + ' ' + mode:<22} {impl:<18} {host:7.1f} {gpu:7.1f} {bench:7.1f}", flush=True)
                if args.kernels and impl == "normfuse":
                    kernel_list(fn)
        del calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
