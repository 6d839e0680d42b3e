# session 18 call 5, 2x H200: the new default `-dp 2` (engine processes), no profiler: arena-c64 and the same workload
# with other images (seed 12351), one after the other on one server
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 420 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads arena-c64 "arena-c64b:--dataset-name arena-like --num-prompts 1000 --max-concurrency 64 --seed 12351" --time-limit 410 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md
grep -h "engine processes ready\|encoder LayerNorm" $W/r-work/logs/*/*server.log | head -5
tail -3 $W/r.log
