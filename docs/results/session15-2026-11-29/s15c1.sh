# session 15 call 1, one H200: the decode MLP, XLA vs the Pallas kernels (tile sweep), 1B at M=8 and 64, 8B at M=8
source .devrun/setup.sh
date -u
timeout 330 python3 -m bench.mlp_probe --preset InternVL3-1B --rows 8,64 --out $OUT/mlp-1b.json 2>&1 | grep -v "pt/s\]" | tail -130
date -u
timeout 200 python3 -m bench.mlp_probe --preset InternVL3-8B --rows 8 --quick --out $OUT/mlp-8b.json 2>&1 | grep -v "pt/s\]" | tail -30
date -u
