#!/usr/bin/env bash
# session 27, call 3 (final code): the biclustered bench with the split rule on by default, the dense latency split,
# the GPU tests, the dense bench against cuDNN, then the network bench if time is left (the script stops by 290 s)
set -u
O=/tmp/r; mkdir -p $O
export NPCONV_TEST_JOBS=16 TESTS_LIMIT=130 PACK=$OUT/gpu_results.tgz PYTHONUNBUFFERED=1
T0=$SECONDS
left() { echo $((290 - (SECONDS - T0))); }
echo "== bic"; timeout 60 python3 bench/bench_gpu_bicluster.py --out $O/gpu_bicluster.json > $O/bic.log 2>&1; echo "rc $? at $((SECONDS-T0)) s"; grep "^gpu_zf" $O/bic.log
echo "== latency"; timeout 70 python3 bench/gpu_profile.py latency --out $O/latency.json > $O/latency.log 2>&1; echo "rc $? at $((SECONDS-T0)) s"; grep -v Warn $O/latency.log
bash bench/run_gpu.sh $O tests 2>&1 | grep -v "PytestBenchmarkWarning\|warner("
L=$(left); echo "== bench_gpu at $((SECONDS-T0)) s"; if [ $L -gt 40 ]; then timeout $((L < 60 ? L : 60)) python3 bench/bench_gpu.py --out $O/gpu.json > $O/bench_gpu.log 2>&1; echo "rc $?"; grep -A21 "^ layer" $O/bench_gpu.log | head -22; fi
tar czf $OUT/gpu_results.tgz -C $O .
L=$(left); echo "== network at $((SECONDS-T0)) s, $L s left"; if [ $L -gt 40 ]; then timeout $L python3 bench/bench_gpu_network.py --out $O/gpu_network.json > $O/bench_gpu_network.log 2>&1; echo "rc $?"; tail -30 $O/bench_gpu_network.log; fi
tar czf $OUT/gpu_results.tgz -C $O .; echo "== done at $((SECONDS-T0)) s"
