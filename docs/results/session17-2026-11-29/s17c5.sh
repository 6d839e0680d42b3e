# session 17 call 5, one H200: this tree (encoder kernels jitted: lowered once per program), cold start, arena-c64, ttft-7tile
source .devrun/setup.sh
date -u
INTERNVL_JAX_CACHE=$W/cache-new timeout 300 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single-proc --workloads arena-c64 ttft-7tile --time-limit 290 --result-dir $W/new --work-dir $W/new-work > $W/new.log 2>&1
echo "new rc $?"; date -u
for r in new; do mkdir -p $OUT/$r; cp $W/$r/e2e-summary.* $OUT/$r/ 2>/dev/null; cp $W/$r-work/logs/*/*server.log $OUT/$r/ 2>/dev/null; echo "== $r"; grep "^| InternVL" $W/$r/e2e-summary.md; grep -h "encoder LayerNorm\|decode MLP:\|compiled .* buckets\|ready in\|lowered" $W/$r-work/logs/*/*server.log | head -6; done
tail -3 $W/new.log
