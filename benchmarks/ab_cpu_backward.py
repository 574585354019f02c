"""The CPU backward kernel against an earlier version of itself, and torch's, in one process.

    git show 3eeb6db:src/normfuse/backends/cpu.py > /tmp/cpu_before.py
    python benchmarks/ab_cpu_backward.py /tmp/cpu_before.py [--shapes 4096x1024,1024x4096]

Loads the given copy of ``backends/cpu.py`` as a second module beside the installed one and
times, interleaved, the backend backward (dx, dweight, dbias) of: torch
(``aten.native_layer_norm_backward``), the earlier kernel and the current one; medians of
rounds of medians, ms. The earlier kernel compiles in this process (a few seconds a shape's
dtype); the current one comes from numba's cache: run the script once after an edit first.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

if "GLIBC_TUNABLES" not in os.environ and sys.platform == "linux":
    # keep freed multi-MiB blocks in the process: no page faults on every output (bench.py)
    os.environ["GLIBC_TUNABLES"] = "glibc.malloc.trim_threshold=4294967295:glibc.malloc.mmap_threshold=4294967295"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from normfuse.backends import cpu  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="path of an earlier backends/cpu.py")
    parser.add_argument("--shapes", default="4096x1024,1024x4096,256x16384")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    # compiled afresh in this process: numba cannot reload cached parallel kernels of a module
    # that is not importable by name
    with open(args.before) as f:
        source = f.read().replace("cache=True", "cache=False")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("cpu_before", f.name)
    before = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(before)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; ms, medians of {args.rounds} rounds")
    print(f"{'shape':>11} {'dtype':>9} | {'torch':>7} {'before':>7} {'now':>7} | before/now torch/now")
    for text in args.shapes.split(","):
        rows, n = (int(v) for v in text.split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            x, dy = torch.randn(rows, n).to(dtype), torch.randn(rows, n).to(dtype)
            w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
            _, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], w, b, 1e-5)
            _, _, nf_mean, nf_rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, False)
            contenders = {
                "torch": lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b, [True] * 3),
                "before": lambda: before.norm_bwd(dy, x, w, nf_mean, nf_rstd, False, True, True, True,
                                                  dweight_dtype=dtype, dbias_dtype=dtype),  # fmt: skip
                "now": lambda: cpu.norm_bwd(dy, x, w, nf_mean, nf_rstd, False, True, True, True,
                                            dweight_dtype=dtype, dbias_dtype=dtype),  # fmt: skip
            }
            for fn in contenders.values():
                fn()
            samples = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    samples[name].append(_median_ms(fn, 7))
            t, o, c = (statistics.median(samples[name]) for name in contenders)
            print(f"{text:>11} {str(dtype).removeprefix('torch.'):>9} | {t:7.3f} {o:7.3f} {c:7.3f} | "
                  f"{o / c:9.2f}x {t / c:8.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
