"""The bf16/fp16 bit conversions of the numba kernels against torch's own casts, bit for bit."""

import numpy as np
import pytest
import torch
from numba import njit

from normfuse.backends._numba_bits import load, prefer_vector_width, prefetch_line, store


@njit
def _widen(a):
    out = np.empty(a.shape[1], dtype=np.float32)
    for j in range(a.shape[1]):
        out[j] = load(a, 0, j)
    return out


@njit
def _narrow(values, out):
    for j in range(values.shape[0]):
        store(out, 0, j, values[j])


_BIT_VIEW = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}


def _same_bits_or_both_nan(got: torch.Tensor, want: torch.Tensor) -> None:
    both_nan = got.isnan() & want.isnan()
    bits_got = got.view(_BIT_VIEW.get(got.dtype, torch.int32))
    bits_want = want.view(_BIT_VIEW.get(want.dtype, torch.int32))
    mismatch = ~both_nan & (bits_got != bits_want)
    assert not mismatch.any(), (got[mismatch][:8], want[mismatch][:8])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widen_every_bit_pattern(dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    storage = values.view(_BIT_VIEW[dtype]).reshape(1, -1).numpy()
    got = torch.from_numpy(_widen(storage))
    _same_bits_or_both_nan(got, values.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_rounds_to_nearest_even(dtype):
    gen = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64)
    edges = torch.tensor(
        [0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e-8, 2.98e-8, 5.96e-8, 6.1e-5, 6.0e-5,
         3.3895e38, 3.4e38, float("inf"), -float("inf"), float("nan"), 1.00390625, 1.01171875],
        dtype=torch.float32,
    )  # fmt: skip
    # every tie pattern around the rounding point, for both parities of the kept bit
    ties = (torch.arange(0, 1 << 16, dtype=torch.int64) << 13 | 0x1000).to(torch.int32).view(torch.float32)
    values = torch.cat([random_bits.to(torch.int32).view(torch.float32), edges, -edges, ties, ties * 2**-20])
    out = torch.empty(1, values.numel(), dtype=dtype)
    _narrow(values.numpy(), out.view(_BIT_VIEW[dtype]).numpy())
    _same_bits_or_both_nan(out[0], values.to(dtype))


@njit
def _hinted_sum(a):
    s = np.float32(0)
    for j in range(a.shape[0]):
        prefetch_line(a.ctypes.data + j * 4 + 256, False, 3)
        prefetch_line(a.ctypes.data + j * 4 + 512, True, 3)
        prefetch_line(a.ctypes.data + j * 4 + 768, False, 2)
        s += a[j]
    prefetch_line(0, False, 3)  # a hint never faults, even at an unmapped address
    return s


def test_prefetch_line_hints_without_changing_results():
    a = np.arange(100, dtype=np.float32)
    assert _hinted_sum(a) == a.sum()
    asm = next(iter(_hinted_sum.inspect_asm().values()))
    if "x86" in next(iter(_hinted_sum.inspect_llvm().values())):  # the instructions themselves on x86
        assert "prefetcht0" in asm and "prefetcht1" in asm
        if "3dnowprefetch" in _cpu_flags():  # the CPU has prefetchw (else LLVM leaves the hint out)
            assert "prefetchw" in asm


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def test_prefetch_line_wants_literal_flags():
    @njit
    def runtime_flag(a, write):
        prefetch_line(a.ctypes.data, write, 3)

    with pytest.raises(Exception, match="prefetch_line"):
        runtime_flag(np.zeros(4, np.float32), True)


@njit
def _scaled_512(a, out):
    prefer_vector_width(512)
    for i in range(a.shape[0]):
        out[i] = a[i] * np.float32(2.0)


@njit
def _scaled_default(a, out):
    prefer_vector_width(0)
    for i in range(a.shape[0]):
        out[i] = a[i] * np.float32(2.0)


def test_prefer_vector_width_sets_the_function_attribute_only_when_asked():
    a = np.arange(100, dtype=np.float32)
    for kernel in (_scaled_512, _scaled_default):
        out = np.empty_like(a)
        kernel(a, out)
        np.testing.assert_array_equal(out, a * 2)
    asked = next(iter(_scaled_512.inspect_llvm().values()))
    default = next(iter(_scaled_default.inspect_llvm().values()))
    assert '"prefer-vector-width"="512"' in asked
    assert "prefer-vector-width" not in default
    if "avx512f" in _cpu_flags() and "x86" in asked:  # the wide registers themselves
        assert "zmm" in next(iter(_scaled_512.inspect_asm().values()))


def test_prefer_vector_width_wants_a_literal():
    @njit
    def runtime_width(bits):
        prefer_vector_width(bits)

    with pytest.raises(Exception, match="prefer_vector_width"):
        runtime_width(512)
