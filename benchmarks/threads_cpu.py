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
import torch.nn.functional as F

import normfuse
from normfuse.cli.bench import reexec_with_malloc_tunables


def _ops(rows: int, n: int) -> dict:
    def make(fn, backward):
        def per_thread():
            x = torch.randn(rows, n, requires_grad=backward)
            w = torch.randn(n, requires_grad=backward)
            b = torch.randn(n, requires_grad=backward)
            if not backward:
                def call():
                    with torch.no_grad():
                        fn(x, (n,), w, b)
            else:
                dy = torch.randn(rows, n)

                def call():
                    torch.autograd.grad(fn(x, (n,), w, b), (x, w, b), dy)
            return call

        return per_thread

    return {
        "normfuse fwd": make(normfuse.layer_norm, False),
        "torch fwd": make(F.layer_norm, False),
        "normfuse f+b": make(normfuse.layer_norm, True),
        "torch f+b": make(F.layer_norm, True),
    }


def _wall(per_thread, threads: int, calls: int) -> float:
    """Seconds for ``threads`` threads to make ``calls`` calls each."""
    fns = [per_thread() for _ in range(threads)]
    for fn in fns:
        fn()  # warm: kernels loaded, buffers allocated
    start_line = threading.Barrier(threads + 1)

    def work(fn):
        start_line.wait()
        for _ in range(calls):
            fn()

    workers = [threading.Thread(target=work, args=(fn,)) for fn in fns]
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
    ops = _ops(4096, 1024)
    counts = (1, 2, 4)
    samples = {(name, k): [] for name in ops for k in counts}
    for _ in range(args.rounds):
        for name, per_thread in ops.items():
            for k in counts:
                # each of k threads makes ``calls`` calls: the speed-up compares the wall time with
                # k times one thread's
                samples[(name, k)].append(_wall(per_thread, k, args.calls))
    print(f"torch {torch.__version__}, normfuse {normfuse.__version__}, intra-op threads {args.intra}, "
          f"{args.calls} calls per thread, 4096x1024 fp32, medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'op':>14} | " + " | ".join(f"{k} thr: ms, speed-up" for k in counts))
    for name in ops:
        one = statistics.median(samples[(name, 1)])
        cells = []
        for k in counts:
            wall = statistics.median(samples[(name, k)])
            cells.append(f"{wall * 1e3:8.1f} {k * one / wall:5.2f}x")
        print(f"{name:>14} | " + " | ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
