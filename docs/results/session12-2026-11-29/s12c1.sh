# session 12 call 1, one H200: arena-c64 InternVL3-1B single, head 8518b11: plain run, then a run with py-spy (native, idle) on the server
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
nvidia-smi --query-gpu=timestamp,index,utilization.gpu --format=csv,noheader,nounits -lms 250 > $W/gpu-util.csv &
e2e() {  # name time-limit
  python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads arena-c64 --time-limit $2 --result-dir $W/$1 --work-dir $W/$1-work > $W/$1.log 2>&1
}
keep() {
  mkdir -p $OUT/$1; cp $W/$1/e2e-summary.* $OUT/$1/ 2>/dev/null; cp $W/$1-work/logs/*/*server.log $OUT/$1/ 2>/dev/null
  grep "^| InternVL" $W/$1/e2e-summary.md | head -12
}
date -u; echo "== plain"; e2e plain 170; echo rc $?; keep plain
date -u; echo "== spy"
e2e spy 240 &
for i in $(seq 1 300); do pgrep -f "bench serve" >/dev/null && break; sleep 0.5; done
SERVER=$(pgrep -f "m serve --model" | head -1); echo "server pid $SERVER"; sleep 3
.devrun/pyspy/py-spy record --native --idle --threads -r 25 -d 40 -f raw -o $OUT/spy-raw.txt -p $SERVER > $W/spy.log 2>&1
echo "py-spy rc $?"; tail -3 $W/spy.log
wait; keep spy
date -u; kill %1; cp $W/gpu-util.csv $OUT/
