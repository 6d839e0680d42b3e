# session 16 call 3, one H200: one engine process at half the concurrency (what each replica of dp2-proc sees at c64), the proxy for the 2-GPU target while no 2-GPU machine is lent
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 560 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single-proc --workloads arena-c64 "arena-c32:--dataset-name arena-like --num-prompts 1000 --max-concurrency 32 --seed 12345" --time-limit 540 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md
tail -3 $W/r.log
