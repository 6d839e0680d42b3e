# session 18 call 4, 2x H200: the new default `-dp 2` (engine processes) under arena-like load at concurrency 64 for
# ~30 s (2000 prompts), with py-spy on the server's API process: what holds its GIL (--gil) and where its CPU goes
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads "arena-c64-2k:--dataset-name arena-like --num-prompts 2000 --max-concurrency 64 --seed 12345" --time-limit 400 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1 &
for i in $(seq 1 600); do grep -qs "Starting main benchmark run" $W/r-work/logs/*/*client.log && break; sleep 0.5; done
SERVER=$(pgrep -f "m serve --model" | head -1); echo "server pid $SERVER"; date -u; sleep 3
.devrun/pyspy/py-spy record --gil --threads -r 50 -d 12 -f raw -o $OUT/spy-gil.txt -p $SERVER > $W/spy1.log 2>&1; echo "spy gil rc $?"; tail -2 $W/spy1.log
.devrun/pyspy/py-spy record --threads -r 50 -d 12 -f raw -o $OUT/spy-cpu.txt -p $SERVER > $W/spy2.log 2>&1; echo "spy cpu rc $?"; tail -2 $W/spy2.log
wait; date -u
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null
grep "^| InternVL" $W/r/e2e-summary.md
grep -h "engine processes ready\|ready in\|data-parallel" $W/r-work/logs/*/*server.log | head -5
tail -3 $W/r.log
