# session 15 call 5, 2x H200: the serving target, arena-c64 on dp2 (the working tree)
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 400 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads arena-c64 --time-limit 390 --result-dir $W/new --work-dir $W/new-work > $W/new.log 2>&1
echo "new rc $?"; date -u
for r in new; do mkdir -p $OUT/$r; cp $W/$r/e2e-summary.* $OUT/$r/ 2>/dev/null; cp $W/$r-work/logs/*/*server.log $OUT/$r/ 2>/dev/null; echo "== $r"; grep "^| InternVL" $W/$r/e2e-summary.md; grep -h "decode MLP\|decode attention\|warm-up runs" $W/$r-work/logs/*/*server.log | head -5; done
tail -5 $W/new.log
