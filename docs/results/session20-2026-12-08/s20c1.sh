# session 20 call 1, one H100: the layers traced once per program (call_layer) against the base tree d54e3ed.
# 1) the optimized HLO of three 1B serving programs (8-tile encode with the Pallas LayerNorm/GELU, a 1 x 2,048 prefill,
#    an 8-step decode with cuDNN attention and the Pallas MLP), both trees; 2) a cold start of each tree (own caches):
#    `bench e2e --configs single --workloads ttft-7tile` (start to /health, the start-up log, TTFT).
# (.devrun/ held copies of this folder's hlo_gpu.py, hlocmp.py and at0/, and `git archive d54e3ed` as base/.)
source .devrun/setup.sh
date -u
for t in new base; do
  if [ $t = base ]; then P=/tmp/site:$PWD/.devrun/base; else P=/tmp/site:$PWD; fi
  PYTHONPATH=$P INTERNVL_JAX_CACHE=$W/hlo-$t timeout 200 python3 .devrun/hlo_gpu.py $W/hlo-$t InternVL3-1B > $OUT/hlo-$t.log 2>&1; echo "hlo $t rc $?"; date -u
  tail -22 $OUT/hlo-$t.log | grep -v Warning
done
python3 .devrun/hlocmp.py $W/hlo-base $W/hlo-new encode prefill decode | cut -c1-300 | head -40
for t in new base; do
  if [ $t = base ]; then D=$PWD/.devrun/base; else D=$PWD; fi
  (cd $D && PYTHONPATH=/tmp/site:$D INTERNVL_JAX_CACHE=$W/cache-$t timeout 190 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads ttft-7tile --time-limit 180 --result-dir $W/r-$t --work-dir $W/r-$t-work > $W/r-$t.log 2>&1; echo "e2e $t rc $?"); date -u
  mkdir -p $OUT/r-$t; cp $W/r-$t/e2e-summary.* $OUT/r-$t/ 2>/dev/null; cp $W/r-$t-work/logs/*/*server.log $OUT/r-$t/ 2>/dev/null
  grep "^| InternVL" $W/r-$t/e2e-summary.md; grep -h "weights on\|lowered\|compiled .* buckets\|warm-up runs\|ready" $W/r-$t-work/logs/*/*server.log | cut -c1-260
  tail -2 $W/r-$t.log
done
