# session 13 call 4, one H200: as call 3, py-spy started 25 s after the benchmark client (call 3 sampled mostly the client's set-up)
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads arena-c64 --time-limit 330 --result-dir $W/spy --work-dir $W/spy-work > $W/spy.log 2>&1 &
for i in $(seq 1 300); do pgrep -f "bench serve" >/dev/null && break; sleep 0.5; done
SERVER=$(pgrep -f "m serve --model" | head -1); echo "server pid $SERVER"; sleep 25; date -u
.devrun/pyspy/py-spy record --native --idle --threads -r 20 -d 30 -f raw -o $OUT/spy-raw.txt -p $SERVER > $W/pyspy.log 2>&1
echo "py-spy rc $?"; tail -3 $W/pyspy.log
wait; date -u
mkdir -p $OUT/spy; cp $W/spy/e2e-summary.* $OUT/spy/ 2>/dev/null; cp $W/spy-work/logs/*/*server.log $OUT/spy/ 2>/dev/null
grep "^| InternVL" $W/spy/e2e-summary.md | head -12
python3 docs/results/session12-2026-11-29/engine_samples.py $OUT/spy-raw.txt | head -40
