# session 16 call 2b (if the budget is short), 2x H200: the 2-GPU serving target, one engine on a 2-device mesh (dp2) vs two engine processes (dp2-proc; and with 64 slots, 32 per replica), arena-c64, same machine
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 250 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 "dp2-proc-s64:-dp 2 --data-parallel-backend process --max-num-seqs 64" --workloads arena-c64 --time-limit 240 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r/*.png $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md; grep -h "engine processes ready\|decode MLP\|ready: serving" $W/r-work/logs/*/*server.log | head -8
tail -5 $W/r.log
