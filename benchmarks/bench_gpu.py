"""GPU benchmark: normfuse (Triton) vs torch eager, torch.compile and Liger-Kernel, vs a copy.

    python benchmarks/bench_gpu.py [--op layer_norm|rms_norm|add_layer_norm|add_rms_norm] [--quick] [--out DIR]

For features 256..65536 at about 32 MiB and 256 MiB of activations, bf16 and fp32, forward and
forward+backward (``torch.autograd.grad`` over every input: x, weight, bias, residual). Times are
medians of CUDA-event timings (``triton.testing.do_bench``). GB/s counts the fewest bytes a
kernel must move: a norm's forward reads x and writes y (2 tensors), forward+backward adds reading
x and dy and writing dx (5 tensors); the add+norm ops also read the residual and write the
residual output, and back (4 and 9 tensors); parameters and per-row statistics are left out.
``of copy`` is that bandwidth over a device-to-device copy of the same tensor measured in the same
run. Peers per op: torch (``F.layer_norm``, ``F.rms_norm`` and a Llama-style composite, or
``x + r`` then the norm), ``torch.compile`` of torch's version, and Liger-Kernel's LayerNorm,
RMSNorm and fused add+RMSNorm where it has one.

``--device cpu --mib 1`` runs the same code on the CPU with a plain timer (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import normfuse
from normfuse.cli.bench import OPS, TENSORS_MOVED, contenders, implementations

FEATURES = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
SIZES_MIB = [32, 256]


def _liger(op: str):
    """Liger-Kernel's version of op as fn(x, residual, normalized_shape, weight, bias), or None."""
    try:
        if op == "layer_norm":
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction

            return lambda x, r, s, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            # in_place=False: Liger's default overwrites dy, which the benchmark reuses
            return lambda x, r, s, w, b: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)
        if op == "add_rms_norm":
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            return lambda x, r, s, w, b: LigerFusedAddRMSNormFunction.apply(x, r, w, 1e-6, 0.0, "llama", False)
    except Exception as error:  # noqa: BLE001 - any import failure means: not available
        print(f"liger-kernel not available ({error}); its columns stay empty")
    return None


def _timer(device: str):
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, return_mode="median")

    def cpu_median_ms(fn):
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return cpu_median_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="layer_norm", choices=OPS)
    parser.add_argument("--quick", action="store_true", help="fewer feature sizes")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--mib", type=int, nargs="*", default=SIZES_MIB, help="activation sizes (default 32 256)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=None, help="directory for results.json")
    args = parser.parse_args()
    bench = _timer(args.device)
    features = [256, 1024, 4096, 16384, 65536] if args.quick else FEATURES
    name = torch.cuda.get_device_properties(0).name if args.device == "cuda" else "cpu"
    print(f"{args.op}: device {name}, torch {torch.__version__}, normfuse {normfuse.__version__}, {time.strftime('%Y-%m-%d')}")
    impls = implementations(args.op, compiled=not args.no_compile)
    liger = _liger(args.op)
    if liger is not None:
        impls["liger"] = liger
    moved = TENSORS_MOVED[args.op]
    rows_out = []
    print(f"{'MiB':>4} {'dtype':>8} {'N':>6} {'mode':>4} | {'copy GB/s':>9} | " + " | ".join(f"{k:>13} GB/s  of copy" for k in impls))
    for size in args.mib:
        for dtype in (torch.bfloat16, torch.float32):
            es = torch.finfo(dtype).bits // 8
            for n in features:
                m = max(1, size * 2**20 // (n * es))
                calls = contenders(args.op, m, n, dtype, args.device, impls)
                copy_ms = bench(calls["copy"])
                tensor_bytes = m * n * es
                copy_gbs = 2 * tensor_bytes / copy_ms / 1e6
                for mode in ("fwd", "f+b"):
                    result = {"op": args.op, "size_mib": size, "dtype": str(dtype), "n": n, "rows": m, "mode": mode,
                              "copy_gbs": copy_gbs}  # fmt: skip
                    cells = []
                    for impl in impls:
                        try:
                            ms = bench(calls[f"{impl} {mode}"])
                        except Exception as error:  # noqa: BLE001 - a peer failing on a shape is a result
                            result[impl] = {"error": repr(error)[:200]}
                            cells.append(f"{'failed':>13}      {'':>7}")
                            continue
                        gbs = moved[mode] * tensor_bytes / ms / 1e6
                        result[impl] = {"ms": ms, "gbs": gbs, "of_copy": gbs / copy_gbs}
                        cells.append(f"{gbs:13.0f} GB/s {gbs / copy_gbs:6.1%}")
                    rows_out.append(result)
                    print(f"{size:>4} {str(dtype)[6:]:>8} {n:>6} {mode:>4} | {copy_gbs:9.0f} | " + " | ".join(cells), flush=True)
                del calls
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"results_{args.op}.json"), "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
