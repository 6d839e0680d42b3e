# session 10 call 5, 2x H200: the final tree's -dp 2 arena-c64 with the padding counters (how much of the encoder's and prefill's work is padding)
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 230 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads arena-c64 --time-limit 220 --result-dir $W/dp2 --work-dir $W/dp2-work > $W/dp2.log 2>&1
echo "rc $?"; sed -n '/## Servers/,/## Plan/p' $W/dp2/e2e-summary.md | grep "^| InternVL"
cp $W/dp2/e2e-summary.md $W/dp2/e2e-summary.json $OUT/ 2>/dev/null
date -u
