"""GPU benchmark: normfuse (Triton) vs torch eager, torch.compile and Liger-Kernel, vs a copy.

    python benchmarks/bench_gpu.py [--quick] [--out DIR]

For features 256..65536 at about 32 MiB and 256 MiB of activations, bf16 and fp32, forward and
forward+backward (``torch.autograd.grad`` over x, weight, bias). Times are medians of CUDA-event
timings (``triton.testing.do_bench``). GB/s counts the fewest bytes a kernel must move: forward
reads x and writes y (2 tensors), forward+backward adds reading x and dy and writing dx (5
tensors); parameters and per-row statistics are left out. ``of copy`` is that bandwidth over a
device-to-device copy of the same tensor measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import normfuse

FEATURES = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
SIZES_MIB = [32, 256]


def _liger():
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception as error:  # noqa: BLE001 - any import failure means: not available
        print(f"liger-kernel not available ({error}); its columns stay empty")
        return None
    return lambda x, shape, w, b, eps=1e-5: LigerLayerNormFunction.apply(x, w, b, eps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer feature sizes")
    parser.add_argument("--out", default=None, help="directory for results.json")
    args = parser.parse_args()
    from triton.testing import do_bench

    features = [256, 1024, 4096, 16384, 65536] if args.quick else FEATURES
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, torch {torch.__version__}, normfuse {normfuse.__version__}, {time.strftime('%Y-%m-%d')}")
    compiled = torch.compile(F.layer_norm, dynamic=True)
    liger = _liger()
    contenders = {"normfuse": normfuse.layer_norm, "torch": F.layer_norm, "compile": compiled}
    if liger is not None:
        contenders["liger"] = liger
    rows_out = []
    header = f"{'MiB':>4} {'dtype':>8} {'N':>6} {'mode':>4} | {'copy GB/s':>9} | " + " | ".join(
        f"{name:>8} GB/s  of copy" for name in contenders
    )
    print(header)
    for size in SIZES_MIB:
        for dtype in (torch.bfloat16, torch.float32):
            es = torch.finfo(dtype).bits // 8
            for n in features:
                m = size * 2**20 // (n * es)
                x = torch.randn(m, n, device="cuda", dtype=dtype)
                w = torch.randn(n, device="cuda", dtype=dtype)
                b = torch.randn(n, device="cuda", dtype=dtype)
                dy = torch.randn_like(x)
                buf = torch.empty_like(x)
                copy_ms = do_bench(lambda: buf.copy_(x), return_mode="median")
                tensor_bytes = m * n * es
                copy_gbs = 2 * tensor_bytes / copy_ms / 1e6
                for mode in ("fwd", "f+b"):
                    result = {"size_mib": size, "dtype": str(dtype), "n": n, "rows": m, "mode": mode, "copy_gbs": copy_gbs}
                    cells = []
                    for name, fn in contenders.items():
                        xg, wg, bg = (t.clone().requires_grad_(mode == "f+b") for t in (x, w, b))
                        if mode == "fwd":
                            call = lambda fn=fn, xg=xg, wg=wg, bg=bg: fn(xg, (n,), wg, bg)  # noqa: E731
                            moved = 2 * tensor_bytes
                        else:
                            call = lambda fn=fn, xg=xg, wg=wg, bg=bg: torch.autograd.grad(  # noqa: E731
                                fn(xg, (n,), wg, bg), (xg, wg, bg), dy
                            )
                            moved = 5 * tensor_bytes
                        try:
                            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                                ms = do_bench(call, return_mode="median")
                        except Exception as error:  # noqa: BLE001 - a peer failing on a shape is a result
                            result[name] = {"error": repr(error)[:200]}
                            cells.append(f"{'failed':>8}      {'':>7}")
                            continue
                        gbs = moved / ms / 1e6
                        result[name] = {"ms": ms, "gbs": gbs, "of_copy": gbs / copy_gbs}
                        cells.append(f"{gbs:8.0f} GB/s {gbs / copy_gbs:6.1%}")
                    rows_out.append(result)
                    print(f"{size:>4} {str(dtype)[6:]:>8} {n:>6} {mode:>4} | {copy_gbs:9.0f} | " + " | ".join(cells), flush=True)
                del x, w, b, dy, buf
                torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
