# session 17 call 4, one H200: base (2fbce16, main at the session's start) vs this tree (encoder LayerNorm and GELU
# kernels, chosen at warm-up), single-proc, arena-c64, same machine, each from a cold start
source .devrun/setup.sh
date -u
( cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) INTERNVL_JAX_CACHE=$W/cache-base timeout 250 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single-proc --workloads arena-c64 --time-limit 240 --result-dir $W/base --work-dir $W/base-work > $W/base.log 2>&1 )
echo "base rc $?"; date -u
INTERNVL_JAX_CACHE=$W/cache-new timeout 250 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single-proc --workloads arena-c64 --time-limit 240 --result-dir $W/new --work-dir $W/new-work > $W/new.log 2>&1
echo "new rc $?"; date -u
for r in base new; do mkdir -p $OUT/$r; cp $W/$r/e2e-summary.* $OUT/$r/ 2>/dev/null; cp $W/$r-work/logs/*/*server.log $OUT/$r/ 2>/dev/null; echo "== $r"; grep "^| InternVL" $W/$r/e2e-summary.md; grep -h "encoder LayerNorm\|decode MLP:\|compiled .* buckets\|ready in\|lowered" $W/$r-work/logs/*/*server.log | head -6; done
tail -3 $W/new.log
