# session 14 call 7, one H200: arena-c64 with --preprocess-threads 8 (t8) vs 4 (t4), same call
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs "t8:--preprocess-threads 8" "t4:--preprocess-threads 4" --workloads arena-c64 --time-limit 300 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null; cp $W/r.log $OUT/r/
grep "^| InternVL" $W/r/e2e-summary.md
tail -5 $W/r.log
