# session 12 call 2, one H200: arena-c64 InternVL3-1B, head 8518b11: preprocessing threads 16 (default) vs 4 vs 2 -- does the pool's GIL traffic drive the engine thread's off-CPU time?
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single "pw4:--preprocess-workers 4" "pw2:--preprocess-workers 2" --workloads arena-c64 --time-limit 470 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo rc $?; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md
