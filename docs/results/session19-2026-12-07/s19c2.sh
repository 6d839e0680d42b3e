# session 19 call 2, one H100: the tanh GELU as fc1's cuBLASLt epilogue (gelu_probe.py); one request at a time
# (ttft-7tile) against a cold 1B server (also its cold start). (The 8B decode re-measurement was dropped: device
# time lost to refused starts.)
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 160 python3 docs/results/session19-2026-12-07/gelu_probe.py $OUT/gelu_probe.json > $OUT/gelu_probe.log 2>&1; echo "gelu rc $?"; date -u
timeout 170 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads ttft-7tile --time-limit 160 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1; echo "e2e rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep -v Warning $OUT/gelu_probe.log | tail -20
grep "^| InternVL" $W/r/e2e-summary.md; grep -h "ready in\|lowered\|encoder LayerNorm\|decode MLP" $W/r-work/logs/*/*server.log | head -12
tail -3 $W/r.log
