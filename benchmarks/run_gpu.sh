#!/usr/bin/env bash
# On a GPU machine (no network): build dnr with its CUDA kernels, run the op/optimizer
# tests (CUDA cases included), every benchmark and a short harness run on the GPU. Logs, JUnit XML and the
# benchmark JSON go to $OUT (default benchmarks/results). Each phase runs under a time
# limit and a failing phase does not stop the next; the exit code is that of the worst.
#
#   OUT=/some/dir bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
status=0
phase() { echo "=== [$(date -u +%H:%M:%S)] $*"; }
run() {  # run <seconds> <log name> <command...>
    local limit=$1 name=$2 rc=0
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "--- $name: exit $rc"
    [ "$rc" -ne 0 ] && status=$rc
    return 0
}

phase "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" | tee -a "$OUT/gpu.txt"

phase "build (CUDA kernels forced on)"
# Two GPU generations with PTX, as CI builds: tests/test_ops.py checks (DNR_REQUIRE_EXT=1) that the
# binary carries machine code for more than one generation and that the recorded list is what it holds.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX} MAX_JOBS=${MAX_JOBS:-16} DNR_BUILD_CUDA=1
run 420 build python -m pip install --no-build-isolation --no-deps --no-index -e .
python -c "import json, dnr.ops; print(json.dumps(dnr.ops.backend()))" | tee "$OUT/backend.json"

phase "tests: every CUDA case of the suite (ops, optimizer, nn, circulant, recurrent, attacks, losses, ...)"
# Every test parametrised over `device` has a "cuda" id (tests/conftest.py DEVICES), so -k cuda selects all of
# them (437 at the last count; the CPU cases run in CI). No -x: the first GPU run should report every failure.
DNR_REQUIRE_EXT=1 run 300 tests python -m pytest -q -p no:cacheprovider -m "not slow" -k cuda \
    --junitxml="$OUT/tests.xml" tests/

phase "benchmarks (--device cuda)"
for bench in pgd_step momentum_stats masked_sgd masked_conv train_step batch_loader; do
    run 120 "bench_$bench" python "benchmarks/bench_$bench.py" --device cuda --out "$OUT"
done
# block-circulant layers (issue 16): the benchmark at conv batch 256
run 180 bench_circulant python benchmarks/bench_circulant.py --device cuda --out "$OUT"
# which product form is faster on the GPU (impl="auto"'s rule was measured on a CPU)
run 120 bench_circulant_forms python benchmarks/bench_circulant_forms.py --device cuda --out "$OUT"

phase "the harness on the GPU: sparse ResNet-18, 3 epochs of 4 steps (synthetic data, PGD-7, bf16 + channels-last)"
rm -rf /tmp/dnr-harness-run
run 180 harness python -m dnr train --dataset synthetic --model resnet18 --epochs 3 --train-size 1024 \
    --batch-size 256 --test-size 256 --eval-size 256 --attack-steps 7 --alpha 0.00784 --eps 0.03137 \
    --precision bf16 --channels-last --no-plots --no-progress --out /tmp/dnr-harness-run \
    --json "$OUT/harness-summary.json"
cp /tmp/dnr-harness-run/metrics.jsonl "$OUT/harness-metrics.jsonl" 2>/dev/null || true

phase "done, exit $status"
exit "$status"
