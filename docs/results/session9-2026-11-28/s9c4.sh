# session 9 call 4, two H100s: arena-c64 InternVL3-1B dp2 (default 4 and 16 preprocessing threads), then ttft-7tile on one GPU; tree = session 9 encoder change
source .devrun/setup.sh
date -u
INTERNVL_JAX_CACHE=$W/cache-dp2 timeout 330 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 "dp2-pp16:-dp 2 --preprocess-workers 16" --workloads arena-c64 --time-limit 320 --result-dir $W/arena --work-dir $W/arena-work > $W/arena.log 2>&1
echo "== arena rc $?"; grep -v "^\s*$" $W/arena.log | grep -iv "warn" | tail -30
date -u
INTERNVL_JAX_CACHE=$W/cache-single timeout 200 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads ttft-7tile --time-limit 190 --result-dir $W/ttft --work-dir $W/ttft-work > $W/ttft.log 2>&1
echo "== ttft rc $?"; grep -v "^\s*$" $W/ttft.log | grep -iv "warn" | tail -20
date -u
cd $W && tar czf $OUT/s9c4.tgz --exclude='cache-*' arena ttft arena-work ttft-work *.log 2>/dev/null; ls -la $OUT
