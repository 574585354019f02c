"""Element access for numba kernels: every storage dtype read as fp32/fp64, written back rounded.

numba has no bfloat16 and no CPU float16, so the kernels see bf16 tensors as ``uint16``
arrays and fp16 tensors as ``int16`` arrays (bit views, no copy). ``load`` widens one
element to the accumulation type and ``store`` narrows with round-to-nearest-even, the
rounding torch uses. The helpers are ``@overload``s chosen by the array's dtype at compile
time, so one kernel source serves all four dtypes with no branch in the inner loops. fp16 goes
through LLVM's half type (F16C's vector conversions) where the host has them, else through
integer versions of the conversions.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba import njit
from numba.extending import intrinsic, overload


@intrinsic
def _bits_as_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (LLVM bitcast, vectorizable)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif bits.bitwidth < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_as_bits(typingctx, value):
    """Reinterpret a float32 as its uint32 bit pattern."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(value), codegen


@njit
def _bf16_to_f32(h):
    return _bits_as_f32((np.uint32(h) & np.uint32(0xFFFF)) << np.uint32(16))


@njit
def _f32_to_bf16(v):
    u = np.uint32(_f32_as_bits(np.float32(v)))
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    # NaN: keep the sign and force a quiet NaN (the rounding above could carry it into Inf).
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x40)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(quiet_nan if is_nan else rounded)


@njit
def _f32_to_bf16_not_nan(v):
    # The NaN select above keeps LLVM from vectorizing the store (4x slower); rows whose
    # values cannot be NaN take this version.
    u = np.uint32(_f32_as_bits(np.float32(v)))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _host_converts_f16() -> bool:
    """Whether LLVM's half conversions compile to instructions here: x86 with F16C (vcvtph2ps,
    vcvtps2ph, vectorized), with numba targeting the host (``NUMBA_CPU_NAME`` unset). Elsewhere
    LLVM would call a runtime library routine the JIT may not find: the integer versions below."""
    from numba.core import config

    if config.CPU_NAME is not None or config.CPU_FEATURES is not None:
        return False
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("f16c"))
    except Exception:  # noqa: BLE001 - no host feature query: the integer versions
        return False


# fp16 through LLVM's half type where the host converts in hardware: the integer versions with
# their selects did not vectorize, and fp16 LayerNorm ran 3.2x slower than torch's (2.78 against
# 0.87 ms at 4096x1024). Both round to nearest even and keep Inf and subnormals exact; a NaN stays
# a NaN (its payload bits may differ, as between torch's own scalar and vector casts).
HARDWARE_F16 = _host_converts_f16()


@intrinsic
def _f16_bits_to_f32_hw(typingctx, bits):
    """fp16 bits (an integer's low 16) widened to float32 by LLVM's ``fpext half``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 16:
            value = builder.trunc(value, ir.IntType(16))
        return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_to_f16_bits_hw(typingctx, value):
    """float32 narrowed to fp16 bits by LLVM's ``fptrunc`` (round to nearest even)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(value), codegen


@njit
def _f16_to_f32(h):
    # Written with one return and selects: inlined early returns upset numba's SSA pass.
    u = np.uint32(h) & np.uint32(0xFFFF)
    sign = (u & np.uint32(0x8000)) << np.uint32(16)
    exponent = (u >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = u & np.uint32(0x3FF)
    # zero and subnormals: m * 2^-24 is exact in float32
    subnormal = np.float32(mantissa) * np.float32(5.9604644775390625e-08)
    subnormal = -subnormal if sign != 0 else subnormal
    biased = np.uint32(0x7F800000) if exponent == 31 else (exponent + np.uint32(112)) << np.uint32(23)
    normal = _bits_as_f32(sign | biased | (mantissa << np.uint32(13)))
    return subnormal if exponent == 0 else normal


@njit
def _f32_to_f16(v):
    """float32 -> IEEE half bits, round-to-nearest-even, overflow to Inf, NaN stays NaN."""
    f = np.uint32(_f32_as_bits(np.float32(v)))
    sign = f & np.uint32(0x80000000)
    f = f ^ sign
    half_sign = sign >> np.uint32(16)
    # |v| >= 65536 rounds to Inf; above 0x7F800000 is NaN
    overflow = np.uint32(0x7E00) if f > np.uint32(0x7F800000) else np.uint32(0x7C00)
    # below the smallest normal half: adding 0.5 makes the FPU round at the half subnormal
    # ulp (2^-24), the result's low bits are the half's bits
    subnormal = np.uint32(_f32_as_bits(_bits_as_f32(f) + np.float32(0.5))) - np.uint32(0x3F000000)
    # normal: rebias the exponent by (15 - 127) << 23 (mod 2^32) and add the
    # round-to-nearest-even bias; numba widens to 64 bits, the carry is masked off below
    normal = (f + np.uint32(0xC8000FFF) + ((f >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    bits = overflow if f >= np.uint32(0x47800000) else (subnormal if f < np.uint32(0x38800000) else normal)
    # np.int16 of a wider integer truncates (LLVM trunc): the bit pattern is what we store
    return np.int16((bits & np.uint32(0xFFFF)) | half_sign)


@intrinsic
def address_as_pointer(typingctx, address, kind):
    """An integer address (``tensor.data_ptr()``) as a typed pointer, for ``numba.carray``.

    ``kind`` is a scalar whose numba type is the element type. Passing addresses instead of
    numpy arrays keeps the Python cost of a kernel call to a few hundred nanoseconds.
    """
    if not isinstance(address, types.Integer) or not isinstance(kind, (types.Integer, types.Float)):
        return None
    pointer_type = types.CPointer(kind)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(address, kind), codegen


@intrinsic
def prefetch_line(typingctx, address, for_write, locality):
    """Hint the 64-byte cache line at an integer address into the data caches (``llvm.prefetch``:
    ``prefetcht0`` with locality 3, ``prefetcht1`` with 2 (L2, not L1), or ``prefetchw`` with
    ``for_write``; both compile-time literals).

    A hint, never a fault: any address may be given. The kernels use it to start loading the
    next row, and to take ownership of the lines their stores will write, while the current row
    is worked on from L1 (see ``backends/cpu.py``, "the next row, hinted into cache").
    """
    if not isinstance(address, types.Integer) or not isinstance(for_write, types.BooleanLiteral):
        return None
    if not isinstance(locality, types.IntegerLiteral) or locality.literal_value not in (1, 2, 3):
        return None
    rw = 1 if for_write.literal_value else 0
    level = locality.literal_value

    def codegen(context, builder, signature, args):
        i32, i8p = ir.IntType(32), ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        data_cache = ir.Constant(i32, 1)
        builder.call(fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, rw), ir.Constant(i32, level), data_cache])
        return context.get_dummy_value()

    return types.none(address, for_write, locality), codegen


def load(a, i, j):
    """a[i, j] widened to the accumulation type (float32, or float64 for float64 arrays)."""


def store(a, i, j, v):
    """a[i, j] = v narrowed to a's storage type with round-to-nearest-even."""


def store_not_nan(a, i, j, v):
    """``store`` for a value known not to be NaN (Inf is fine): vectorizes for bf16."""


def acc_scalar(a, v):
    """v as a scalar of a's accumulation type (float64 for float64 arrays, else float32)."""


@overload(load)
def _load_overload(a, i, j):
    if a.dtype in (types.float32, types.float64):
        return lambda a, i, j: a[i, j]
    if a.dtype == types.uint16:
        return lambda a, i, j: _bf16_to_f32(a[i, j])
    if a.dtype == types.int16:
        if HARDWARE_F16:
            return lambda a, i, j: _f16_bits_to_f32_hw(a[i, j])
        return lambda a, i, j: _f16_to_f32(a[i, j])
    return None


@overload(store)
def _store_overload(a, i, j, v):
    if a.dtype == types.float32:

        def impl(a, i, j, v):
            a[i, j] = np.float32(v)

        return impl
    if a.dtype == types.float64:

        def impl(a, i, j, v):
            a[i, j] = np.float64(v)

        return impl
    if a.dtype == types.uint16:

        def impl(a, i, j, v):
            a[i, j] = _f32_to_bf16(v)

        return impl
    if a.dtype == types.int16:
        if HARDWARE_F16:

            def impl(a, i, j, v):
                a[i, j] = _f32_to_f16_bits_hw(np.float32(v))

            return impl

        def impl(a, i, j, v):
            a[i, j] = _f32_to_f16(v)

        return impl
    return None


@overload(store_not_nan)
def _store_not_nan_overload(a, i, j, v):
    if a.dtype == types.uint16:

        def impl(a, i, j, v):
            a[i, j] = _f32_to_bf16_not_nan(v)

        return impl
    return _store_overload(a, i, j, v)


@overload(acc_scalar)
def _acc_scalar_overload(a, v):
    if a.dtype == types.float64:
        return lambda a, v: np.float64(v)
    return lambda a, v: np.float32(v)


def round_as(a, v):
    """v rounded to a's storage type and widened back (a None: v unchanged)."""


@overload(round_as, inline="always")
def _round_as_overload(a, v):
    if a is None or isinstance(a, types.NoneType):
        return lambda a, v: v
    if a.dtype == types.float64:
        return lambda a, v: v
    if a.dtype == types.float32:
        return lambda a, v: np.float32(v)
    if a.dtype == types.uint16:
        return lambda a, v: _bf16_to_f32(_f32_to_bf16(v))
    if a.dtype == types.int16:
        if HARDWARE_F16:
            return lambda a, v: _f16_bits_to_f32_hw(_f32_to_f16_bits_hw(np.float32(v)))
        return lambda a, v: _f16_to_f32(_f32_to_f16(v))
    return None


def round_as_not_nan(a, v):
    """``round_as`` of a value that cannot be NaN: in bf16 without the NaN select, which keeps
    LLVM from vectorizing the loop around it (the Llama formula's x-hat rounding in the
    forward's output loop: 2x slower in bf16 with it, benchmarks/family_norms_cpu.py)."""


@overload(round_as_not_nan, inline="always")
def _round_as_not_nan_overload(a, v):
    if a is not None and not isinstance(a, types.NoneType) and a.dtype == types.uint16:
        return lambda a, v: _bf16_to_f32(_f32_to_bf16_not_nan(v))
    return lambda a, v: round_as(a, v)


@intrinsic
def keep_bit(typingctx, row_key, col, threshold):
    """Dropout's keep decision for one element, in 32-bit integer operations (normfuse._dropout):
    ``fmix32(row_key ^ (col * 0x85EBCA77)) >> 8 < threshold``.

    Written as LLVM i32 arithmetic because numba widens integer products to 64 bits, which
    AVX2 cannot multiply in vector registers; at 32 bits the loop vectorizes (vpmulld).
    """
    if not all(isinstance(t, types.Integer) for t in (row_key, col, threshold)):
        return None
    from normfuse import _dropout

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def to32(value, typ):
            if typ.bitwidth > 32:
                return builder.trunc(value, i32)
            if typ.bitwidth < 32:
                return builder.zext(value, i32)
            return value

        key, c, thr = (to32(v, t) for v, t in zip(args, signature.args))

        def const(v):
            return ir.Constant(i32, v)

        h = builder.xor(key, builder.mul(c, const(_dropout.COL_MULTIPLIER)))
        h = builder.xor(h, builder.lshr(h, const(16)))
        h = builder.mul(h, const(_dropout.FMIX_1))
        h = builder.xor(h, builder.lshr(h, const(13)))
        h = builder.mul(h, const(_dropout.FMIX_2))
        h = builder.xor(h, builder.lshr(h, const(16)))
        return builder.icmp_unsigned("<", builder.lshr(h, const(32 - _dropout.KEEP_BITS)), thr)

    return types.boolean(row_key, col, threshold), codegen


@intrinsic
def select(typingctx, condition, if_true, if_false):
    """``if_true if condition else if_false`` as one LLVM select (branch-free, vectorizable)."""
    if condition != types.boolean or if_true != if_false:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(*args)

    return if_true(condition, if_true, if_false), codegen


@intrinsic
def prefer_vector_width(typingctx, bits):
    """Ask LLVM to vectorize the calling function's loops ``bits`` wide (a compile-time literal;
    0: LLVM's choice for the CPU): the function attribute ``"prefer-vector-width"``, on this
    function alone, where numba's target options would set it for every function in the process.
    """
    if not isinstance(bits, types.IntegerLiteral):
        return None
    width = bits.literal_value

    def codegen(context, builder, signature, args):
        if width:
            # llvmlite's attribute set takes only the names it knows; a string attribute goes
            # in through set.add and is printed as written (an llvmlite whose attributes are no
            # set gets LLVM's own width: slower, never wrong)
            try:
                set.add(builder.function.attributes, f'"prefer-vector-width"="{width}"')
            except TypeError:
                pass
        return context.get_dummy_value()

    return types.none(bits), codegen
