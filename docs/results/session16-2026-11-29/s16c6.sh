# session 16 call 6, one H200: TTFT one request at a time (ttft-7tile) with the engine in the server's process vs in its own, same machine
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 280 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single single-proc --workloads ttft-7tile --time-limit 270 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md
tail -3 $W/r.log
