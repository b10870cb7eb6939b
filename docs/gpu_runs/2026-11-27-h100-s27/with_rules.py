"""Run bench/bench_gpu_bicluster.py with the SVD split rule chosen from a bicrules JSON (session 27): SVD_SPLITS the
fastest split count at batch 1, SVD_SPLIT_MAX_COLUMNS up to the largest measured batch where a split case beats no
split (729 output columns an image for ZF conv2)."""
import json
import runpy
import sys

sys.path.insert(0, ".")
from npconv.kernels.cuda import ops_bicluster  # noqa: E402

rep = json.load(open(sys.argv[1]))
sp = {}
for k, v in rep.items():
    case, b = k.split("/")
    sp.setdefault(int(b[1:]), {})[case] = v["speedup_vs_dense"]
for b in sorted(sp):
    print(f"b{b}: " + ", ".join(f"{c} {s:.3f}" for c, s in sorted(sp[b].items())), flush=True)
best1 = max(("svd_s2", "svd_s4"), key=lambda c: sp[1][c])
wins = [b for b in sorted(sp) if max(sp[b]["svd_s2"], sp[b]["svd_s4"]) > sp[b]["svd"]]
top = max(wins) if wins else 0
ops_bicluster.SVD_SPLITS = int(best1[-1])
ops_bicluster.SVD_SPLIT_MAX_COLUMNS = top * 729
print("rules: SVD_SPLITS", ops_bicluster.SVD_SPLITS, "SVD_SPLIT_MAX_COLUMNS", ops_bicluster.SVD_SPLIT_MAX_COLUMNS,
      flush=True)
sys.argv = ["bench/bench_gpu_bicluster.py", "--out", sys.argv[2]]
runpy.run_path("bench/bench_gpu_bicluster.py", run_name="__main__")
