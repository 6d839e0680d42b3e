# session 14 call 1, one H200: dispatch probe (argument scaling, stacked vs separate weights, host trace of the serving steps)
source .devrun/setup.sh
date -u
timeout 400 python3 -m bench.dispatch_probe --out $OUT 2>&1 | grep -v "^WARNING\|xla_bridge" | tail -60
date -u
