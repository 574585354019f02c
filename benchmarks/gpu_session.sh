#!/usr/bin/env bash
# One device-tool call: the test suite on CUDA, then the GPU benchmark. Results under $OUT.
# Liger-Kernel travels as a wheel in .whl/ (see /work/.library/device/README.md).
set -u
OUT=${OUT:-/tmp/normfuse-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton, numba; print('torch', torch.__version__, 'triton', triton.__version__, 'numba', numba.__version__)" | tee -a "$OUT/device.txt"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | grep -v Warning
for op in rms_norm add_rms_norm add_layer_norm; do
  timeout "${OP_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_gpu.py --op "$op" --quick --out "$OUT" 2>&1 | tee "$OUT/bench_$op.log" | grep -v Warning
done
timeout "${SWEEP_TIMEOUT:-200}" python3 benchmarks/sweep_triton.py > "$OUT/sweep.log" 2>&1
echo "sweep: $(grep -c GB/s "$OUT/sweep.log") settings timed (sweep.log)"
# the Triton kernels and every test parametrized by device, on the GPU (the CPU suite runs in CI)
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/backends/test_triton.py 2>&1 | tee "$OUT/pytest.log" | tail -15
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests -k cuda 2>&1 | tee -a "$OUT/pytest.log" | tail -15
