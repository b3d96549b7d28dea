#!/usr/bin/env bash
# Every kernel check that needs an NVIDIA GPU, in one run of under 5 minutes:
#   1. the kernel tests on CUDA (Triton launchers against the torch reference, fp32/fp16/bf16,
#      the @pytest.mark.gpu large grids included), log + JUnit XML;
#   2. the kernel benchmark (Triton vs reference vs a loop over deltas, achieved bandwidth vs peak).
# Results: files directly under ${OUT:-benchmarks/results/gpu} (at most 8, no subfolders), and the
# benchmark's summary line printed last.
#
# The GPU machine has its own torch/triton (no .venv, no package registry): it runs `python3`. If its
# image lacks pytest, stage the pure-Python pytest packages from this machine's .venv first and
# carry the folder:   benchmarks/gpu_check.sh --stage-pytest     (writes .gpu_pytest/, ~3 MB)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--stage-pytest" ]]; then
    site=$(ls -d .venv/lib/python3*/site-packages | head -1)
    rm -rf .gpu_pytest && mkdir -p .gpu_pytest
    for p in pytest _pytest pluggy iniconfig packaging py.py; do cp -r "$site/$p" .gpu_pytest/; done
    echo "staged pytest into .gpu_pytest/ (carry it to the GPU machine)"
    exit 0
fi

OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset TRITON_INTERPRET DELTASERVE_KERNELS  # real kernels on the GPU; tests/conftest.py sees the driver
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export BENCH_RESULTS_DIR="$OUT"
export PYTHONDONTWRITEBYTECODE=1
start=$(date +%s)

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton missing:", e)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PY" -c "import pytest" 2>/dev/null; then
    if [[ -d .gpu_pytest ]]; then
        export PYTHONPATH="$PWD/.gpu_pytest:$PYTHONPATH"
    fi
fi
tests_rc=0
if "$PY" -c "import pytest" 2>/dev/null; then
    # -p no:cacheprovider: the tree may be read-only; 200 s leaves the benchmark its minute and a half.
    timeout 200 "$PY" -m pytest tests/test_kernels_*.py -q -p no:cacheprovider -x --maxfail=5 \
        --junitxml="$OUT/kernel_tests.xml" -o junit_family=xunit1 > "$OUT/kernel_tests.log" 2>&1
    tests_rc=$?
    tail -n 15 "$OUT/kernel_tests.log"
else
    echo "pytest is not importable here: run 'benchmarks/gpu_check.sh --stage-pytest' locally and carry .gpu_pytest" \
        | tee "$OUT/kernel_tests.log"
    tests_rc=3
fi
echo "kernel tests: rc=$tests_rc after $(( $(date +%s) - start )) s"

timeout 150 "$PY" benchmarks/bench_kernels.py --quick --device cuda > "$OUT/bench_kernels.log" 2>&1
bench_rc=$?
echo "kernel benchmark: rc=$bench_rc after $(( $(date +%s) - start )) s"
tail -n 25 "$OUT/bench_kernels.log"
echo "tests_rc=$tests_rc bench_rc=$bench_rc wall_s=$(( $(date +%s) - start ))" > "$OUT/status.txt"
grep '^summary:' "$OUT/bench_kernels.log" | tail -1
[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
