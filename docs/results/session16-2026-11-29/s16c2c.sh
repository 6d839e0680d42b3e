# session 16 call 2c, 2x H200 (lent at 13:05 UTC with 291 s of device time left): the 2-GPU target, dp2-proc with 32 slots per replica first, then the mesh dp2 if time allows, arena-c64, same machine
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 240 python3 -m bench e2e --stop-timeout 5 --gpus 2 --presets InternVL3-1B --configs "dp2-proc-s64:-dp 2 --data-parallel-backend process --max-num-seqs 64" dp2 --workloads arena-c64 --time-limit 228 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md
tail -4 $W/r.log
