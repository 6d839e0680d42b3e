# session 20 call 3 (rewritten after ~390 s of device time went to refused starts): what bounds the compile phase of a
# cold start: XLA's autotuning off for the encode and prefill programs only (cuBLAS's heuristic algorithms;
# .devrun/at0/sitecustomize.py patches Runner.compiler_options), against the default, one machine; then the
# --mm-encoder-gelu tanh server against the default on arena-c64 (XLA's cache warm from the first run).
# (.devrun/ held copies of this folder's hlo_gpu.py, hlocmp.py and at0/, and `git archive d54e3ed` as base/.)
source .devrun/setup.sh
date -u
run() {  # name tree-dir cache xla-flags configs workloads limit
  (cd $2 && PYTHONPATH=$4/tmp/site:$2 INTERNVL_JAX_CACHE=$W/$3 timeout $(($7 + 10)) python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs $5 --workloads $6 --time-limit $7 --result-dir $W/r-$1 --work-dir $W/r-$1-work > $W/r-$1.log 2>&1; echo "e2e $1 rc $?"); date -u
  mkdir -p $OUT/r-$1; cp $W/r-$1/e2e-summary.* $OUT/r-$1/ 2>/dev/null; for f in $W/r-$1-work/logs/*/*server.log; do grep -v "Delay kernel" $f | tail -c 60000 > $OUT/r-$1/$(basename $f); done
  grep "^| InternVL" $W/r-$1/e2e-summary.md; grep -h "weights on\|lowered\|compiled .* buckets\|warm-up runs" $W/r-$1-work/logs/*/*server.log | cut -c1-260
  tail -1 $W/r-$1.log
}
run new $PWD cache-new "" single ttft-7tile 120
run new-at0 $PWD cache-new-at0 "$PWD/.devrun/at0:" single ttft-7tile 120
run gelu $PWD cache-new "" "exact: tanh:--mm-encoder-gelu=tanh" arena-c64 150
