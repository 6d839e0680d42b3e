# session 14 call 3 (--time-limit 150 is the whole run's: only t4 ran; call 4 is this with 500), one H200: --preprocess-threads 4 (t4, t4b) vs 1 (t1), same tree, same call: ttft-7tile, arena at concurrency 1, arena-c64
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs "t4:--preprocess-threads 4" "t1:--preprocess-threads 1" "t4b:--preprocess-threads 4" --workloads ttft-7tile "arena-c1:--dataset-name arena-like --num-prompts 64 --max-concurrency 1 --seed 12349" arena-c64 --time-limit 150 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null; cp $W/r.log $OUT/r/
grep "^| InternVL" $W/r/e2e-summary.md
tail -5 $W/r.log
