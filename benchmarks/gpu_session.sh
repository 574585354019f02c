#!/usr/bin/env bash
# Device-tool calls: the test suite on CUDA and the GPU benchmarks, results under $OUT.
#
#   STAGES="overhead tests ln ops" MIB="256" OPS="rms_norm add_layer_norm" bash benchmarks/gpu_session.sh
#
# Stages (default: all, in this order): overhead (benchmarks/host_overhead.py, host time per call
# layer by layer, with a profile), tests (the Triton kernels' tests and every test parametrized by
# device, on cuda), timeline (fb_timeline.py: host, GPU and do_bench time per call; SHAPES picks
# the shapes, its GPU column is the kernels' time with the host out of the way), ln (bench_gpu.py for LayerNorm, --quick unless FULL=1), ops (bench_gpu.py
# --quick for each op in OPS), wide (sweep_triton.py --wide: the wide-row backward, looped vs
# split), narrow (sweep_triton.py --narrow: tile size for narrow rows), fwd (sweep_triton.py --fwd:
# warps for wide forward rows), sweep (sweep_triton.py). Each stage has its own timeout
# so that one slow stage leaves the others their time; MIB picks the activation sizes.
# Liger-Kernel travels as a wheel in .whl/ (see /work/.library/device/README.md).
set -u
OUT=${OUT:-/tmp/normfuse-gpu}
STAGES=${STAGES:-overhead tests timeline wide narrow fwd ln ops sweep}
MIB=${MIB:-32 256}
OPS=${OPS:-rms_norm add_rms_norm add_layer_norm}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)" | tee -a "$OUT/device.txt"
has() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }
quick=--quick
[ "${FULL:-0}" = 1 ] && quick=

if has overhead; then
  timeout "${OVERHEAD_TIMEOUT:-60}" python3 benchmarks/host_overhead.py --profile 2>&1 | tee "$OUT/overhead.log" | head -40
fi
if has tests; then
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider $xdist tests -k "cuda or test_triton" 2>&1 \
    | tee "$OUT/pytest.log" | tail -15
fi
if has timeline; then
  # SHAPES="256:bfloat16:16384 256:float32:16384 ..." picks the shapes (MiB:dtype:features)
  timeout "${TIMELINE_TIMEOUT:-150}" python3 benchmarks/fb_timeline.py --kernels ${SHAPES:+--shapes $SHAPES} 2>&1 \
    | tee "$OUT/timeline.log" | grep -v Warning
fi
if has wide; then
  timeout "${WIDE_TIMEOUT:-120}" python3 benchmarks/sweep_triton.py --wide > "$OUT/wide.log" 2>&1
  grep -E "looped" "$OUT/wide.log"
fi
if has narrow; then
  timeout "${NARROW_TIMEOUT:-120}" python3 benchmarks/sweep_triton.py --narrow 2>&1 | tee "$OUT/narrow.log" | grep narrow
fi
if has fwd; then
  timeout "${FWD_TIMEOUT:-120}" python3 benchmarks/sweep_triton.py --fwd 2>&1 | tee "$OUT/fwd.log" | grep "^fwd"
fi
if has ln; then
  timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_gpu.py $quick --mib $MIB 2>&1 | tee "$OUT/bench.log" | grep -v Warning
fi
if has ops; then
  for op in $OPS; do
    timeout "${OP_BENCH_TIMEOUT:-100}" python3 benchmarks/bench_gpu.py --op "$op" --quick --mib $MIB 2>&1 \
      | tee "$OUT/bench_$op.log" | grep -v Warning
  done
fi
if has sweep; then
  timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/sweep_triton.py > "$OUT/sweep.log" 2>&1
  echo "sweep: $(grep -c GB/s "$OUT/sweep.log") settings timed (sweep.log)"
fi
