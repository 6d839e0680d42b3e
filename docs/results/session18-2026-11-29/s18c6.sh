# session 18 call 6, 2x H200: how long `-dp 2` engine processes take to stop, the new tree (replicas leave with os._exit
# after their last step) then base 176371d (the interpreter's teardown), 64 arena-like requests each, one machine
source .devrun/setup.sh
date -u
WL="tiny:--dataset-name arena-like --num-prompts 64 --max-concurrency 64 --seed 12352"
for tree in new base; do
  if [ $tree = new ]; then dir=$PWD; else dir=$PWD/.devrun/base; fi
  (cd $dir && INTERNVL_JAX_CACHE=$W/cache-$tree PYTHONPATH=/tmp/site:$dir timeout 200 python3 -m bench e2e --stop-timeout 30 --gpus 2 --presets InternVL3-1B --configs "dp2p:-dp 2 --data-parallel-backend process" --workloads "$WL" --time-limit 190 --result-dir $W/r-$tree --work-dir $W/w-$tree > $W/$tree.log 2>&1); echo "$tree rc $?"; date -u
  mkdir -p $OUT/$tree; cp $W/r-$tree/e2e-summary.md $OUT/$tree/ 2>/dev/null; cp $W/w-$tree/logs/*/*server.log $OUT/$tree/ 2>/dev/null
  grep "^| InternVL" $W/r-$tree/e2e-summary.md | head -2
  grep -h "received SIGTERM\|engine processes stopped\|serve: stopped" $W/w-$tree/logs/*/*server.log
done
