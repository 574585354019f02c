"""Python threads calling normfuse at once (a threaded server, a data thread beside training).

    python benchmarks/threads_cpu.py            # 1, 2 and 4 threads, torch's intra-op count 1
    python benchmarks/threads_cpu.py --intra 2  # each call may also use torch's/numba's pool

Every thread makes ``--calls`` calls of one op (normfuse, or torch for comparison) on its own
4096x1024 fp32 tensor: the LayerNorm forward in inference, and forward + backward. Printed:
the wall time of all the calls, and the speed-up over one thread making the same total number
of calls (2.0 with two threads on two cores is the most there is). Median of ``--rounds``
rounds, the contenders alternating each round.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

import normfuse
from normfuse.cli.bench import contenders, implementations, reexec_with_malloc_tunables

ROWS, N = 4096, 1024
OPS = ("normfuse fwd", "torch fwd", "normfuse f+b", "torch f+b")


def _wall(calls_per_thread: list, calls: int) -> float:
    """Seconds for one thread per callable to make ``calls`` calls of it each, all at once."""
    for fn in calls_per_thread:
        fn()  # warm: kernels loaded, buffers allocated
    start_line = threading.Barrier(len(calls_per_thread) + 1)

    def work(fn):
        start_line.wait()
        for _ in range(calls):
            fn()

    workers = [threading.Thread(target=work, args=(fn,)) for fn in calls_per_thread]
    for t in workers:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in workers:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    reexec_with_malloc_tunables(warm_first=False)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intra", type=int, default=1, help="torch.set_num_threads in every thread")
    parser.add_argument("--calls", type=int, default=40, help="calls per thread")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.intra)
    counts = (1, 2, 4)
    # the benchmark's own contenders (normfuse and torch, forward and forward+backward), one set of
    # tensors per thread
    impls = implementations("layer_norm", compiled=False)
    per_thread = [contenders("layer_norm", ROWS, N, torch.float32, "cpu", impls) for _ in range(max(counts))]
    samples = {(name, k): [] for name in OPS for k in counts}
    for _ in range(args.rounds):
        for name in OPS:
            for k in counts:
                # each of k threads makes ``calls`` calls: the speed-up compares the wall time with
                # k times one thread's
                samples[(name, k)].append(_wall([c[name] for c in per_thread[:k]], args.calls))
    print(f"torch {torch.__version__}, normfuse {normfuse.__version__}, intra-op threads {args.intra}, "
          f"{args.calls} calls per thread, {ROWS}x{N} fp32, medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'op':>14} | " + " | ".join(f"{k} thr: ms, speed-up" for k in counts))
    for name in OPS:
        one = statistics.median(samples[(name, 1)])
        cells = []
        for k in counts:
            wall = statistics.median(samples[(name, k)])
            cells.append(f"{wall * 1e3:8.1f} {k * one / wall:5.2f}x")
        print(f"{name:>14} | " + " | ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
