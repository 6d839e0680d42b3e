# session 14 call 9, one H200: host cost per dispatch (bench.host_probe), base 6077648 vs the working tree (decode mask kept on the device)
source .devrun/setup.sh
date -u
( cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) timeout 100 python3 -m bench.host_probe --out $OUT/base --modes all --calls 30 2>&1 | grep -v "^WARNING\|xla_bridge" | tail -6 )
date -u
timeout 100 python3 -m bench.host_probe --out $OUT/new --modes all --calls 30 2>&1 | grep -v "^WARNING\|xla_bridge" | tail -6
date -u
