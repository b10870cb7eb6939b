#!/usr/bin/env bash
# The checks of a machine with a CUDA device, in one go (issue 3): the GPU tests with NPCONV_REQUIRE_GPU=1 (a skip
# is a failure there), then the GPU benchmarks, each step under its own time limit so that one hang cannot eat the
# others' time. Logs and JSON files go to OUTDIR (default out/gpu), and OUTDIR/gpu_results.tgz packs them.
#
#   bash bench/run_gpu.sh [OUTDIR] [STEP ...]     # steps: info tests suite bench network factored tune (default:
#                                                 # all but suite; suite = the whole test suite, GPU tests included)
#                                                 # and, only when named: probe host small cpblock bicrules
#                                                 # lowrank ncu memcheck racecheck
#
# probe: bench/gpu_profile.py's CUDA-event times of the parts of the dense conv2 and of variants; host: its split of
# the host time of eager batch-1 calls (npconv's Python, CuPy, NumPy) and the per-call times, queued and
# synchronised; small: its timings at small batches (dense convs against cuDNN, the biclustered CP expansion and SVD
# reduction fused or not); cpblock: the CP layer with 1, 2, 4 images a bic_cp_front block; bicrules: the biclustered
# SVD layer's spatial stage with its channels in 1, 2 or 4 splits; lowrank: ZF conv1's
# low-rank form on each path (one lr_conv launch, factor_conv + lr_expand, factor_conv + GEMM + bias_add), the
# separable form in one sep_conv launch or two factor_conv passes, and at batches 1 and 8 the filter-sharing rules
# of lr_conv, sep_conv and mono_conv; ncu: Nsight
# Compute on bench/gpu_profile.py's workloads (report and its details page; NCU_SET=b1 for the batch-1 set, cp for
# the CP front end, convs for conv3/conv4 at batch 8, lr for ZF conv1's forms, sep for the separable form in one
# launch or two); memcheck / racecheck:
# compute-sanitizer over the float32 GPU tests (racecheck: the kernels with shared memory; RACECHECK_K narrows its
# pytest -k expression), each stopped at its time limit.
#
# Environment: PYTHON (default python3), NPCONV_TEST_JOBS (pytest-xdist workers, default 8), TESTS_LIMIT,
# SUITE_LIMIT, HOST_LIMIT, BICRULES_LIMIT (seconds), TAIL_LINES (log lines echoed per step), PACK (where the .tgz goes).
set -u
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
shift || true
steps=${*:-info tests bench network factored tune}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NPCONV_REQUIRE_GPU=1
py=${PYTHON:-python3}
jobs=${NPCONV_TEST_JOBS:-8}

step() {  # step NAME LIMIT_S COMMAND...: run it under timeout, log to OUTDIR/NAME.log, print its tail
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    tail -n "${TAIL_LINES:-25}" "$out/$name.log"
    tar czf "${PACK:-$out/gpu_results.tgz}" -C "$out" --exclude gpu_results.tgz .   # what is done so far
}

for s in $steps; do
    case $s in
    info)
        step info 60 bash -c "nvidia-smi; $py -c 'import sys, numpy, scipy, numba, cupy; print(sys.version); \
print(\"numpy\", numpy.__version__, \"scipy\", scipy.__version__, \"numba\", numba.__version__, \"cupy\", \
cupy.__version__, \"cuda runtime\", cupy.cuda.runtime.runtimeGetVersion()); import torch; print(\"torch\", \
torch.__version__, \"cudnn\", torch.backends.cudnn.version())'; nproc; lscpu | grep -i 'model name'" ;;
    tests)
        step tests "${TESTS_LIMIT:-240}" "$py" -m pytest -q -m gpu -n "$jobs" -p no:cacheprovider --timeout 120 tests ;;
    suite)
        step suite "${SUITE_LIMIT:-420}" "$py" -m pytest -q -n "$jobs" -p no:cacheprovider --timeout 300 ;;
    bench)
        step bench_gpu 150 "$py" bench/bench_gpu.py --out "$out/gpu.json" ;;
    network)
        step bench_gpu_network 240 "$py" bench/bench_gpu_network.py --out "$out/gpu_network.json" ;;
    factored)
        step bench_gpu_bicluster 90 "$py" bench/bench_gpu_bicluster.py --out "$out/gpu_bicluster.json"
        step bench_gpu_lowrank 90 "$py" bench/bench_gpu_lowrank.py --out "$out/gpu_lowrank.json" ;;
    tune)
        step bench_tune_gpu 90 "$py" bench/bench_tune.py --gpu ;;
    probe)
        step probe "${PROBE_LIMIT:-120}" "$py" bench/gpu_profile.py probe --out "$out/probe.json" ;;
    host)
        step host "${HOST_LIMIT:-150}" "$py" bench/gpu_profile.py host --out "$out/host.json" ;;
    small)
        step small "${SMALL_LIMIT:-150}" "$py" bench/gpu_profile.py small --out "$out/small.json" ;;
    cpblock)
        step cpblock 90 "$py" bench/gpu_profile.py cpblock --out "$out/cpblock.json" ;;
    bicrules)
        step bicrules "${BICRULES_LIMIT:-180}" "$py" bench/gpu_profile.py bicrules --out "$out/bicrules.json" ;;
    lowrank)
        step lowrank "${LOWRANK_LIMIT:-120}" "$py" bench/gpu_profile.py lowrank --out "$out/lowrank.json" ;;
    ncu)
        step ncu "${NCU_LIMIT:-150}" ncu --profile-from-start off --clock-control none --target-processes all \
            --section SpeedOfLight --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
            --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats -f -o "$out/ncu" \
            "$py" bench/gpu_profile.py ncu --workloads "${NCU_SET:-b128}"
        step ncu_details 60 ncu -i "$out/ncu.ncu-rep" --page details ;;
    memcheck)   # one process (under the sanitizer, each pytest-xdist worker's start costs more than its tests)
        step memcheck "${MEMCHECK_LIMIT:-150}" compute-sanitizer --tool memcheck --error-exitcode 3 \
            --print-limit 20 "$py" -m pytest -q -m gpu -p no:xdist -p no:cacheprovider --timeout 60 \
            -k "float32 and not strided" tests/gpu ;;
    racecheck)  # shared-memory hazards: the kernels with shared memory
        step racecheck "${RACECHECK_LIMIT:-100}" compute-sanitizer --tool racecheck --error-exitcode 3 \
            --print-limit 20 "$py" -m pytest -q -m gpu -p no:xdist -p no:cacheprovider --timeout 60 \
            -k "${RACECHECK_K:-float32 and not strided and not network}" tests/gpu/test_gpu_bicluster.py \
            tests/gpu/test_gpu_lowrank.py tests/gpu/test_gpu_ops.py ;;
    *)
        echo "unknown step $s (steps: info tests suite bench network factored tune probe host small cpblock" \
            "bicrules lowrank ncu memcheck racecheck)"
        exit 2 ;;
    esac
done
