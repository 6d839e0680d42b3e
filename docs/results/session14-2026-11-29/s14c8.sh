# session 14 call 8, one H200: base 7a5af83 vs the working tree (thumbnail resized beside the grid), ttft-7tile and arena at concurrency 1
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
( cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) python3 -c "from bench.common import source_digest; print('base source', source_digest())" && PYTHONPATH=/tmp/site:$(pwd) timeout 200 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads ttft-7tile "arena-c1:--dataset-name arena-like --num-prompts 64 --max-concurrency 1 --seed 12349" --time-limit 190 --result-dir $W/base --work-dir $W/base-work > $W/base.log 2>&1 )
echo "base rc $?"; date -u
timeout 150 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads ttft-7tile "arena-c1:--dataset-name arena-like --num-prompts 64 --max-concurrency 1 --seed 12349" --time-limit 140 --result-dir $W/new --work-dir $W/new-work > $W/new.log 2>&1
echo "new rc $?"; date -u
for r in base new; do mkdir -p $OUT/$r; cp $W/$r/e2e-summary.* $OUT/$r/ 2>/dev/null; cp $W/$r-work/logs/*/*server.log $OUT/$r/ 2>/dev/null; echo "== $r"; grep "^| InternVL" $W/$r/e2e-summary.md; done
