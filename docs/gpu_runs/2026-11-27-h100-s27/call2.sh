#!/usr/bin/env bash
# session 27, call 2: bicrules at batches 1-8 (SVD splits 1/2/4, the split kernel its own entry point), the
# biclustered bench with splits off and with the rule chosen, Nsight Compute of conv3/conv4 at batch 8, GPU tests
set -u
O=/tmp/r; mkdir -p $O
export NPCONV_TEST_JOBS=16 TESTS_LIMIT=150 NCU_LIMIT=150 PACK=$OUT/gpu_results.tgz PYTHONUNBUFFERED=1 TAIL_LINES=30
T0=$SECONDS
echo "== bicrules"; timeout 90 python3 bench/gpu_profile.py bicrules --batches 1 2 3 4 6 8 --out $O/bicrules.json > $O/bicrules.log 2>&1; echo "rc $? at $((SECONDS-T0)) s"; cat $O/bicrules.log | grep -v Warn
echo "== bic_default"; timeout 80 python3 bench/bench_gpu_bicluster.py --out $O/gpu_bicluster.json > $O/bic_default.log 2>&1; echo "rc $? at $((SECONDS-T0)) s"; grep "svd\|dense" $O/bic_default.log
echo "== bic_rule"; timeout 80 python3 .gpu/with_rules.py $O/bicrules.json $O/gpu_bicluster_rule.json > $O/bic_rule.log 2>&1; echo "rc $? at $((SECONDS-T0)) s"; grep -v "^gpu_zf\|^speedup" $O/bic_rule.log | head -12; grep "svd\|dense" $O/bic_rule.log
NCU_SET=convs bash bench/run_gpu.sh $O ncu
bash bench/run_gpu.sh $O tests


echo "== ncu durations"; ncu -i $O/ncu.ncu-rep --page details --csv 2>/dev/null | python3 -c "
import csv, sys
for r in csv.DictReader(sys.stdin):
    if r['Metric Name'] == 'Duration':
        print(r['ID'], r['Kernel Name'][:70], r['Grid Size'], r['Block Size'], r['Metric Value'], r['Metric Unit'])
"
tar czf $OUT/gpu_results.tgz -C $O .; echo "== done at $((SECONDS-T0)) s"
