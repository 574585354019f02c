"""Where one LayerNorm forward+backward's time goes on the CPU, in the benchmark's own setting.

    python benchmarks/fb_segments_cpu.py [--shape 4096x1024] [--dtype float32] [--rounds 40]

Runs ``bench_cpu.py``'s contenders for one shape (copy, the f+b floor, torch and normfuse
forward and forward+backward) interleaved as that script does, so that the caches hold what
they hold there, and stamps the time at the edges of normfuse's pieces during its
forward+backward: the front end up to ``NormFunction.forward``, the backend's forward call
(allocating its outputs and running the kernel), saving for backward, autograd between the
forward's return and ``NormFunction.backward`` (the benchmark's ``torch.autograd.grad`` call
included), the backend's backward call, and autograd after it. The stamps cost a few
microseconds each. Medians over the rounds, ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from normfuse import ops
from normfuse.backends import cpu
from normfuse.cli.bench import _WARMUP_ONLY, contenders, implementations, reexec_with_malloc_tunables

_stamps: list[tuple[str, float]] = []


def _stamped(function, label: str):
    def call(*args, **kwargs):
        _stamps.append((f"{label} starts", time.perf_counter()))
        result = function(*args, **kwargs)
        _stamps.append((f"{label} ends", time.perf_counter()))
        return result

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x1024")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    reexec_with_malloc_tunables()
    rows, n = (int(v) for v in args.shape.split("x"))
    cpu.norm_fwd = _stamped(cpu.norm_fwd, "backend forward")
    cpu.norm_bwd = _stamped(cpu.norm_bwd, "backend backward")
    ops._setup_context = _stamped(ops._setup_context, "save for backward")
    ops.NormFunction.forward = staticmethod(_stamped(ops.NormFunction.forward, "NormFunction.forward"))
    ops.NormFunction.backward = staticmethod(_stamped(ops.NormFunction.backward, "NormFunction.backward"))
    calls = contenders("layer_norm", rows, n, getattr(torch, args.dtype), "cpu", implementations("layer_norm", False), floor=True)
    for call in calls.values():  # warm-up: kernels loaded, allocator settled
        for _ in range(3):
            call()
    if os.environ.get(_WARMUP_ONLY):
        return  # the run that fills numba's cache (see reexec_with_malloc_tunables)
    segments: list[list[tuple[str, float]]] = []
    for _ in range(args.rounds):
        for name, call in calls.items():
            for _ in range(3):  # as bench_cpu.py's inner repetitions
                if name != "normfuse f+b":
                    call()
                    continue
                _stamps.clear()
                start = time.perf_counter()
                call()
                marks = [("call starts", start), *_stamps, ("call ends", time.perf_counter())]
                segments.append([(f"{a} -> {b}", (tb - ta) * 1e3) for (a, ta), (b, tb) in zip(marks, marks[1:])])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.shape} {args.dtype}, "
          f"medians of {len(segments)} calls, ms")  # fmt: skip
    for k, (name, _) in enumerate(segments[0]):
        print(f"  {name:60s} {statistics.median(s[k][1] for s in segments):7.3f}")
    total = statistics.median(sum(t for _, t in s) for s in segments)
    backend = {f"backend {d} starts -> backend {d} ends" for d in ("forward", "backward")}
    kernels = statistics.median(sum(t for label, t in s if label in backend) for s in segments)
    print(f"  {'whole forward+backward':60s} {total:7.3f}")
    print(f"  {'backend calls':60s} {kernels:7.3f}")
    print(f"  {'the rest (Python, autograd)':60s} {total - kernels:7.3f}")


if __name__ == "__main__":
    main()
