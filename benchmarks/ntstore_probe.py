"""Would non-temporal stores pay here? ``d = a + b`` over 16 MiB fp32 arrays, one thread, with
ordinary and with non-temporal 64-byte vector stores, written directly in LLVM IR (llvmlite,
which numba brings) so that nothing but the store kind differs.

    python benchmarks/ntstore_probe.py

The fused add+norm kernels write two such streams (the residual output and the output) and pay
a write-allocate read for each; numba's loops cannot emit vector non-temporal stores (LLVM's
vectorizer will not widen a scalar store marked non-temporal without a known 64-byte alignment).
The figure here is what an aligned-body, peeled-edges version of the kernels' store loops could
gain at most on the memory side.
"""

import ctypes
import statistics
import time

import llvmlite.binding as llvm
import numpy as np

llvm.initialize_native_target(); llvm.initialize_native_asmprinter()
def make(nt):
    md = ', !nontemporal !0' if nt else ''
    ir = f"""
define void @f(float* noalias %dst, float* noalias %a, float* noalias %b, i64 %n) {{
entry:
  br label %loop
loop:
  %i = phi i64 [0, %entry], [%next, %loop]
  %pa = getelementptr float, float* %a, i64 %i
  %pb = getelementptr float, float* %b, i64 %i
  %pd = getelementptr float, float* %dst, i64 %i
  %va = bitcast float* %pa to <16 x float>*
  %vb = bitcast float* %pb to <16 x float>*
  %vd = bitcast float* %pd to <16 x float>*
  %x = load <16 x float>, <16 x float>* %va, align 64
  %y = load <16 x float>, <16 x float>* %vb, align 64
  %s = fadd <16 x float> %x, %y
  store <16 x float> %s, <16 x float>* %vd, align 64{md}
  %next = add i64 %i, 16
  %c = icmp ult i64 %next, %n
  br i1 %c, label %loop, label %exit
exit:
  fence seq_cst
  ret void
}}
!0 = !{{i32 1}}
"""
    mod = llvm.parse_assembly(ir); mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten())
    ee = llvm.create_mcjit_compiler(mod, tm); ee.finalize_object()
    asm = tm.emit_assembly(mod)
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(ee.get_function_address("f")), ee, asm
def aligned(n):
    buf = np.empty(n + 16, np.float32); off = (-buf.ctypes.data % 64) // 4
    return buf[off:off+n]
n = 4096*1024
a, b, d = aligned(n), aligned(n), aligned(n)
a[:] = 1; b[:] = 2
reg, e1, asm1 = make(False); ntf, e2, asm2 = make(True)
print("nt asm has vmovntps:", "vmovntps" in asm2, "regular:", "vmovntps" in asm1)
fs = {"regular": lambda: reg(d.ctypes.data, a.ctypes.data, b.ctypes.data, n), "nontemporal": lambda: ntf(d.ctypes.data, a.ctypes.data, b.ctypes.data, n)}
for f in fs.values(): f()
s = {k: [] for k in fs}
for _ in range(15):
    for k, f in fs.items():
        t = time.perf_counter(); f(); s[k].append(time.perf_counter() - t)
print({k: "%.3f ms" % (statistics.median(v)*1e3) for k, v in s.items()}, d[:3])
