#!/usr/bin/env bash
# session 27, call 1: bicrules (SVD f4 / splits), the biclustered bench by default and with the best SVD rule,
# the GPU tests, then (time left) the dense bench against cuDNN
set -u
O=/tmp/r; mkdir -p $O
export NPCONV_TEST_JOBS=16 TESTS_LIMIT=150 BICRULES_LIMIT=190 PACK=$OUT/gpu_results.tgz PYTHONUNBUFFERED=1
T0=$SECONDS
bash bench/run_gpu.sh $O info bicrules
echo "== bic_default"; timeout 80 python3 bench/bench_gpu_bicluster.py --out $O/gpu_bicluster.json > $O/bic_default.log 2>&1; echo "rc $? at $((SECONDS-T0)) s"; tail -14 $O/bic_default.log
echo "== bic_best"; timeout 80 python3 .gpu/with_rules.py $O/bicrules.json $O/gpu_bicluster_best.json > $O/bic_best.log 2>&1; echo "rc $? at $((SECONDS-T0)) s"; head -2 $O/bic_best.log; tail -14 $O/bic_best.log
bash bench/run_gpu.sh $O tests
left=$((560 - (SECONDS - T0)))
echo "== at $((SECONDS-T0)) s, $left s left for bench_gpu"
if [ $left -gt 60 ]; then timeout $left python3 bench/bench_gpu.py --out $O/gpu.json > $O/bench_gpu.log 2>&1; echo "rc $?"; tail -22 $O/bench_gpu.log; fi
tar czf $OUT/gpu_results.tgz -C $O .
echo "== done at $((SECONDS-T0)) s"
