# session 9 call 5 (warm 2x H200 of call 4): InternVL3-8B ttft-7tile on one GPU; then encoder base vs new on one GPU
source .devrun/setup.sh
date -u
INTERNVL_JAX_CACHE=$W/cache-8b timeout 250 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-8B --configs single --workloads ttft-7tile --time-limit 240 --result-dir $W/ttft8 --work-dir $W/ttft8-work > $W/ttft8.log 2>&1
echo "== ttft8 rc $?"; grep "ttft-7tile | single\|^| InternVL3-8B | single" $W/ttft8.log | head; grep -A3 "client TTFT" $W/ttft8.log | tail -2
date -u
E="python3 -m bench encoder --preset InternVL3-1B --devices 1 --baseline none --repeats 5 --no-copy --batches 1,8,32,64"
(cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) timeout 60 $E --out $W/enc-base.json > $W/enc-base.log 2>&1); echo "== base"; grep -A6 "^mode" $W/enc-base.log | cut -c1-75
timeout 60 $E --out $W/enc-new.json > $W/enc-new.log 2>&1; echo "== new"; grep -A6 "^mode" $W/enc-new.log | cut -c1-75
date -u
cd $W && tar czf $OUT/s9c5.tgz --exclude='cache-*' ttft8 ttft8-work *.log *.json 2>/dev/null; ls -la $OUT
