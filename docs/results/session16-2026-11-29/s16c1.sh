# session 16 call 1, one H200: the engine in the server's process (single) vs in a process of its own (single-proc), arena-c64, same machine
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 560 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single single-proc --workloads arena-c64 --time-limit 540 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md; grep -h "engine processes ready\|decode MLP\|ready: serving" $W/r-work/logs/*/*server.log | head -8
tail -5 $W/r.log
