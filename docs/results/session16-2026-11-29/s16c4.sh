# session 16 call 4, one H200: cold start-up (empty caches) of the engine in a process of its own vs in the server's process, same machine
source .devrun/setup.sh
start() {  # $1 backend, $2 cache dir
  INTERNVL_JAX_CACHE=$2 python3 -m serve --model InternVL3-1B --load-format dummy --port 0 --data-parallel-backend $1 > $W/start-$1.log 2>&1 &
  local pid=$! t0=$(date +%s.%N)
  for i in $(seq 1 300); do grep -q "ready: serving" $W/start-$1.log && break; sleep 0.5; done
  echo "$1 ready after $(echo "$(date +%s.%N) - $t0" | bc) s"
  kill -TERM $pid; wait $pid
  grep -h "lowered\|compiled\|ready in\|weights on\|warm-up runs" $W/start-$1.log
  cp $W/start-$1.log $OUT/
}
date -u
start process $W/cache-process
start mesh $W/cache-mesh
date -u
