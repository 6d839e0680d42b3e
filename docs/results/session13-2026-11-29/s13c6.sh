# session 13 call 6, one H200: host cost of each serving dispatch on the committed tree (bench.host_probe, CUDA graphs "all", the server's default)
source .devrun/setup.sh
date -u
timeout 230 python3 -m bench.host_probe --out $OUT --modes all --calls 20 2>&1 | grep -v "^WARNING\|xla_bridge" | tail -12
date -u
