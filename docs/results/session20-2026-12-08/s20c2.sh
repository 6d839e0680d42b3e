# session 20 call 2, one H100: the cold-start A/B of call 1 in the other order (base first), then the new tree with 8
# compile threads instead of 16; the host's cores.
# (.devrun/ held copies of this folder's hlo_gpu.py, hlocmp.py and at0/, and `git archive d54e3ed` as base/.)
source .devrun/setup.sh
lscpu | grep -E "^(Model name|Socket|Core|Thread|CPU\(s\))"
date -u
run() {  # name tree-dir server-args
  (cd $2 && PYTHONPATH=/tmp/site:$2 INTERNVL_JAX_CACHE=$W/cache-$1 timeout 190 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads ttft-7tile --server-args "$3" --time-limit 180 --result-dir $W/r-$1 --work-dir $W/r-$1-work > $W/r-$1.log 2>&1; echo "e2e $1 rc $?"); date -u
  mkdir -p $OUT/r-$1; cp $W/r-$1/e2e-summary.* $OUT/r-$1/ 2>/dev/null; cp $W/r-$1-work/logs/*/*server.log $OUT/r-$1/ 2>/dev/null
  grep "^| InternVL" $W/r-$1/e2e-summary.md | head -2; grep -h "weights on\|lowered\|compiled .* buckets\|warm-up runs" $W/r-$1-work/logs/*/*server.log | cut -c1-260
  tail -1 $W/r-$1.log
}
run base $PWD/.devrun/base ""
run new $PWD ""
run new-w8 $PWD "--compile-workers 8"
