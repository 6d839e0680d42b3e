# session 14 call 5, one H200: host cost per dispatch (bench.host_probe), XLA's default command buffers vs WHILE and CONDITIONAL inside them
source .devrun/setup.sh
date -u
timeout 200 python3 -m bench.host_probe --out $OUT/default --modes all --calls 20 2>&1 | grep -v "^WARNING\|xla_bridge" | tail -6
date -u
XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL timeout 200 python3 -m bench.host_probe --out $OUT/while --modes all --calls 20 2>&1 | grep -v "^WARNING\|xla_bridge" | tail -6
date -u
