# session 18 call 1, 2x H200: the 2-GPU serving target with the encoder kernels, and which data-parallel backend -dp 2 should default to: two engine processes with 32 slots each (dp2-proc-s64), one engine on a 2-device mesh (dp2, today's default), two engine processes with the default 32 slots (16 each), arena-c64, same machine
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 575 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs "dp2-proc-s64:-dp 2 --data-parallel-backend process --max-num-seqs 64" dp2 dp2-proc --workloads arena-c64 --time-limit 565 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r/*.png $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md; grep -h "engine processes ready\|encoder LayerNorm\|ready in\|lowered" $W/r-work/logs/*/*server.log | head -12
tail -5 $W/r.log
