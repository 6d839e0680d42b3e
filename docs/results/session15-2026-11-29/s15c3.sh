# session 15 call 3, one H200: base 0eea16a vs the working tree (Pallas decode MLP chosen at warm-up), arena-c64; the planned tiles' probe
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
timeout 100 python3 -m bench.mlp_probe --preset InternVL3-1B --rows 16,32,64 --out $OUT/mlp-1b-planned.json 2>&1 | grep -v "pt/s" | tail -8
date -u
( cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) python3 -c "from bench.common import source_digest; print('base source', source_digest())" && PYTHONPATH=/tmp/site:$(pwd) timeout 220 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads arena-c64 --time-limit 210 --result-dir $W/base --work-dir $W/base-work > $W/base.log 2>&1 )
echo "base rc $?"; date -u
timeout 220 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads arena-c64 --time-limit 210 --result-dir $W/new --work-dir $W/new-work > $W/new.log 2>&1
echo "new rc $?"; date -u
for r in base new; do mkdir -p $OUT/$r; cp $W/$r/e2e-summary.* $OUT/$r/ 2>/dev/null; cp $W/$r-work/logs/*/*server.log $OUT/$r/ 2>/dev/null; echo "== $r"; grep "^| InternVL" $W/$r/e2e-summary.md; grep -h "decode MLP\|decode attention\|warm-up runs\|ready in\|started in" $W/$r-work/logs/*/*server.log | head -5; done
