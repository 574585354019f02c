"""Launch-setting sweep for the Triton kernels, side by side on one GPU (256 MiB activations).

    python benchmarks/sweep_triton.py

Backward (the fused kernel and the looped one for wide rows) over warps per program and
programs per SM; the looped forward over chunk size and warps. Prints GB/s (fewest bytes:
backward reads x and dy and writes dx; forward reads x and writes y) and the fraction of a
device-to-device copy measured in the same run. The winners go into ``TUNING`` in
``normfuse/backends/triton.py``.
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench

from normfuse.backends import triton as tb

SIZE = 256 * 2**20


def _tensors(n: int, dtype: torch.dtype):
    m = SIZE // (n * torch.finfo(dtype).bits // 8)
    x = torch.randn(m, n, device="cuda", dtype=dtype)
    w = torch.randn(n, device="cuda", dtype=dtype)
    return x, w, torch.randn_like(x)


def _set(**settings) -> None:
    tb.TUNING.update(settings)
    tb.clear_config_caches()


def main() -> None:
    default = dict(tb.TUNING)
    print(f"device {torch.cuda.get_device_name()}, defaults {default}")
    for dtype in (torch.bfloat16, torch.float32):
        es = torch.finfo(dtype).bits // 8
        for n in (1024, 4096, 8192, 16384, 65536):
            x, w, dy = _tensors(n, dtype)
            buf = torch.empty_like(x)
            copy_gbs = 2 * x.numel() * es / do_bench(lambda: buf.copy_(x), return_mode="median") / 1e6
            _, _, mean, rstd, _ = tb.norm_fwd(x, w, w, 1e-5, False)
            bwd_bytes = 3 * x.numel() * es
            fused = n <= tb.MAX_FUSED_N_BWD
            blocks = (None,) if fused else (2048, 4096, 8192)
            for num_warps, per_sm, block in itertools.product((4, 8, 16), (1, 2, 4), blocks):
                _set(bwd_warps=num_warps, bwd_programs_per_sm=per_sm, bwd_loop_warps=num_warps,
                     bwd_loop_block_n=block or default["bwd_loop_block_n"])  # fmt: skip
                ms = do_bench(lambda: tb.norm_bwd(dy, x, w, mean, rstd, False, True, True, True), return_mode="median")
                gbs = bwd_bytes / ms / 1e6
                print(
                    f"bwd {str(dtype)[6:]:>8} n={n:>6} warps={num_warps:>2} programs/SM={per_sm} "
                    f"block={block or '-':>5} | {gbs:6.0f} GB/s {gbs / copy_gbs:6.1%} of copy",
                    flush=True,
                )
            _set(**default)
            if n > tb.MAX_FUSED_N:
                for num_warps, block in itertools.product((4, 8, 16), (2048, 4096, 8192)):
                    _set(loop_warps=num_warps, loop_block_n=block)
                    ms = do_bench(lambda: tb.norm_fwd_inference(x, x.shape[0], n, w, w, 1e-5, False), return_mode="median")
                    gbs = 2 * x.numel() * es / ms / 1e6
                    print(
                        f"fwd {str(dtype)[6:]:>8} n={n:>6} warps={num_warps:>2} block={block:>5} | "
                        f"{gbs:6.0f} GB/s {gbs / copy_gbs:6.1%} of copy",
                        flush=True,
                    )
                _set(**default)
            del x, w, dy, buf, mean, rstd
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
