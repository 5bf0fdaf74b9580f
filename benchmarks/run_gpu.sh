#!/usr/bin/env bash
# On a GPU machine (no network): build dnr with its CUDA kernels, run the CUDA cases of the test
# suite, every benchmark and a short harness run on the GPU.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh
#
# A shorter run (a re-check after a fix, with little device time left) selects what it needs:
#   TESTS_K="cuda and masked"   the pytest -k expression (default: cuda, every CUDA case)
#   BENCHES="masked_conv train_step"   the benchmarks (default: all nine; "" for none)
#   HARNESS=0                   skip the harness run
#
# Everything (logs, JUnit XML, benchmark JSON, the harness's summary) is written to a scratch folder
# and packed after every phase into ONE file, $OUT/gpu-run.tar.gz (default OUT: benchmarks/results):
# a device lease returns only a few files, and a run stopped at its limit still returns what the
# phases before it produced. The whole run keeps to BUDGET_S seconds (default 540): each phase runs
# under its own limit, cut to the time left, and a phase with under 20 s left is skipped. A failing
# phase does not stop the next; the exit code is that of the worst.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-$(command -v python3 || command -v python)}
RES=$(mktemp -d /tmp/dnr-gpu-run.XXXXXX)
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
mkdir -p "$OUT"
status=0
phase() { echo "=== [$(date -u +%H:%M:%S), $(( DEADLINE - $(date +%s) )) s left] $*"; }
pack() { tar -czf "$RES.tgz" -C "$RES" . && mv -f "$RES.tgz" "$OUT/gpu-run.tar.gz"; }
run() {  # run <seconds> <log name> <command...>: within the deadline, output to $RES/<name>.log
    local limit=$1 name=$2 rc=0 left
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt 20 ]; then
        echo "--- $name: skipped, ${left} s left" | tee "$RES/$name.log"
        status=124; pack; return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$RES/$name.log" 2>&1 || rc=$?
    tail -n 25 "$RES/$name.log"
    echo "--- $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$RES/phases.txt"
    [ "$rc" -ne 0 ] && status=$rc
    pack
    return 0
}

phase "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  nvcc --version | tail -n 2; } 2>&1 | tee "$RES/gpu.txt"
pack

phase "build (CUDA kernels forced on)"
# Two GPU generations with PTX, as CI builds: tests/test_ops.py checks (DNR_REQUIRE_EXT=1) that the
# binary carries machine code for more than one generation and that the recorded list is what it holds.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX} MAX_JOBS=${MAX_JOBS:-16} DNR_BUILD_CUDA=1
run 240 build "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
"$PY" -c "import json, dnr.ops; print(json.dumps(dnr.ops.backend()))" 2>&1 | tee "$RES/backend.json"

phase "tests: every CUDA case of the suite (ops, optimizer, nn, circulant, recurrent, attacks, losses, ...)"
# Every test parametrised over `device` has a "cuda" id (tests/conftest.py DEVICES), so -k cuda selects all of
# them (the CPU cases run in CI). No -x: the first GPU run should report every failure; -v so that a run cut
# at its limit still lists the tests it finished.
# With pytest-xdist there (the lent machine's image has it), six workers, one test file each at a time
# (--dist loadfile keeps a file's tests in order in one process, as a serial run has them).
extra=()
"$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout=120)
"$PY" -c "import xdist" 2>/dev/null && extra+=(-n 6 --dist loadfile)
OMP_NUM_THREADS=2 DNR_REQUIRE_EXT=1 run 240 tests "$PY" -m pytest -v --tb=short -p no:cacheprovider -m "not slow" \
    -k "${TESTS_K:-cuda}" "${extra[@]}" --durations=15 --junitxml="$RES/tests.xml" tests/

phase "benchmarks (--device cuda)"
# circulant: block-circulant layers (issue 16) at conv batch 256; circulant_forms: which product form is
# faster on the GPU (impl="auto"'s rule was measured on a CPU); curriculum: what a SAT curriculum's step and
# H-SAT's Hessian measurement cost against plain adversarial training (the SAT study's small_cnn checkpoints)
for bench in ${BENCHES-pgd_step momentum_stats masked_sgd masked_conv train_step batch_loader circulant circulant_forms curriculum}; do
    run 90 "bench_$bench" "$PY" "benchmarks/bench_$bench.py" --device cuda --repeats 20 --out "$RES"
done

phase "the harness on the GPU: sparse ResNet-18, 3 epochs of 4 steps (synthetic data, PGD-7, bf16 + channels-last)"
rm -rf /tmp/dnr-harness-run
[ "${HARNESS:-1}" = 1 ] && run 120 harness "$PY" -m dnr train --dataset synthetic --model resnet18 --epochs 3 --train-size 1024 \
    --batch-size 256 --test-size 256 --eval-size 256 --attack-steps 7 --alpha 0.00784 --eps 0.03137 \
    --precision bf16 --channels-last --no-plots --no-progress --out /tmp/dnr-harness-run \
    --json "$RES/harness-summary.json"
cp /tmp/dnr-harness-run/metrics.jsonl "$RES/harness-metrics.jsonl" 2>/dev/null || true
pack

phase "done, exit $status; results in $OUT/gpu-run.tar.gz"
exit "$status"
