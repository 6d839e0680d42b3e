# session 18 call 2, one H200: the GELU kernel's tiles (rows x warps) at 8 and 32 tiles, alone (kernel_probe)
source .devrun/setup.sh
date -u
timeout 300 python3 -m bench.kernel_probe --preset InternVL3-1B --tiles 32,8 --kernels gelu --sweep --sweep-rows 1,2,4 --sweep-warps 4,8,16,32 --out $OUT/kernel_probe.json > $OUT/kernel_probe.log 2>&1; echo "probe rc $?"; date -u
cat $OUT/kernel_probe.log
