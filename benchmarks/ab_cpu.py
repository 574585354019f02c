"""The CPU kernels against an earlier version of themselves, and torch's, in one process.

    git show 3eeb6db:src/normfuse/backends/cpu.py > /tmp/cpu_before.py
    python benchmarks/ab_cpu.py /tmp/cpu_before.py [--forward] [--add] [--rms] [--shapes 4096x1024,1024x4096]

Loads the given copy of ``backends/cpu.py`` as a second module beside the installed one and
times, interleaved, the backend backward (dx, dweight, dbias), or with ``--forward`` the
training forward (output, mean, rstd), of LayerNorm (``--rms``: RMSNorm; ``--add``: the residual
add + norm, whose backward also takes the residual output's incoming gradient): torch
(``aten.native_layer_norm[_backward]``; ``F.rms_norm``), the earlier kernel and the current one;
medians of rounds of medians, ms. Run it twice and read the second run: a numba kernel compiled in the
running process runs slower than the same kernel loaded from the cache (see
``normfuse.backends.cpu``), so the first run only fills the cache for both versions.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from normfuse.backends import cpu
from normfuse.cli.bench import reexec_with_malloc_tunables


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
    parser.add_argument("--forward", action="store_true", help="time the forward instead of the backward")
    parser.add_argument("--rms", action="store_true", help="RMSNorm instead of LayerNorm")
    parser.add_argument("--add", action="store_true",
                        help="the residual add + norm (torch: x + r, then the norm); its backward also takes the "
                             "residual output's incoming gradient and returns dresidual")  # fmt: skip
    args = parser.parse_args()
    # a quiet allocator, as bench.py; this script times outside interleaved_medians, so no
    # warm-up pass (run it twice instead, as the docstring says)
    reexec_with_malloc_tunables(warm_first=False)
    # imported by name from a directory of its own, so that numba can cache its kernels too
    # (it reloads a cached kernel by importing the module that defined it)
    with open(args.before, "rb") as f:
        source = f.read()
    home = Path(tempfile.gettempdir()) / "normfuse_ab" / hashlib.sha1(source).hexdigest()[:12]
    home.mkdir(parents=True, exist_ok=True)
    (home / "cpu_before.py").write_bytes(source)
    sys.path.insert(0, str(home))
    before = importlib.import_module("cpu_before")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; ms, medians of {args.rounds} rounds")
    print(f"{'shape':>11} {'dtype':>9} | {'torch':>7} {'before':>7} {'now':>7} | before/now torch/now")
    for text in args.shapes.split(","):
        rows, n = (int(v) for v in text.split("x"))
        for dtype in (torch.float32, torch.bfloat16):
            x, dy = torch.randn(rows, n).to(dtype), torch.randn(rows, n).to(dtype)
            w, b = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
            _, mean, rstd = torch.ops.aten.native_layer_norm(x, [n], w, b, 1e-5)
            _, _, nf_mean, nf_rstd, _ = cpu.norm_fwd(x, w, b, 1e-5, args.rms)
            if args.add:
                r = torch.randn(rows, n).to(dtype)
                torch_norm = (lambda h: torch.nn.functional.rms_norm(h, [n], w)) if args.rms else (
                    lambda h: torch.ops.aten.native_layer_norm(h, [n], w, b, 1e-5))
                contenders = {
                    "torch": lambda: torch_norm(x + r),
                    "before": lambda: before.norm_fwd(x, w, None if args.rms else b, 1e-5, args.rms, residual=r,
                                                      residual_out_dtype=dtype),  # fmt: skip
                    "now": lambda: cpu.norm_fwd(x, w, None if args.rms else b, 1e-5, args.rms, residual=r,
                                                residual_out_dtype=dtype),  # fmt: skip
                }
            elif args.forward:
                torch_fwd = (lambda: torch.nn.functional.rms_norm(x, [n], w)) if args.rms else (
                    lambda: torch.ops.aten.native_layer_norm(x, [n], w, b, 1e-5))
                contenders = {
                    "torch": torch_fwd,
                    "before": lambda: before.norm_fwd(x, w, None if args.rms else b, 1e-5, args.rms),
                    "now": lambda: cpu.norm_fwd(x, w, None if args.rms else b, 1e-5, args.rms),
                }
            elif args.add:
                # torch: the norm's backward; the add's gradient (dh + dresidual_out, returned as
                # dx and dresidual) is one more elementwise op
                dres_out = torch.randn(rows, n).to(dtype)
                add_kwargs = dict(add=True, dresidual_out=dres_out, need_dresidual=True, x_dtype=dtype,
                                  residual_dtype=dtype, dweight_dtype=dtype, dbias_dtype=dtype)  # fmt: skip
                contenders = {
                    "torch": lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b, [True] * 3)[0]
                    + dres_out,
                    "before": lambda: before.norm_bwd(dy, x, w, nf_mean, nf_rstd, args.rms, True, True, True, **add_kwargs),
                    "now": lambda: cpu.norm_bwd(dy, x, w, nf_mean, nf_rstd, args.rms, True, True, True, **add_kwargs),
                }
            else:
                contenders = {
                    "torch": lambda: torch.ops.aten.native_layer_norm_backward(dy, x, [n], mean, rstd, w, b, [True] * 3),
                    "before": lambda: before.norm_bwd(dy, x, w, nf_mean, nf_rstd, args.rms, True, True, True,
                                                      dweight_dtype=dtype, dbias_dtype=dtype),  # fmt: skip
                    "now": lambda: cpu.norm_bwd(dy, x, w, nf_mean, nf_rstd, args.rms, True, True, True,
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
