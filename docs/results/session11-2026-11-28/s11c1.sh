# session 11 call 1, 2x H200: arena-c64 InternVL3-1B -dp 2: head (paired prefill rows, encoder calls cut to buckets) vs base b2b23e5 (tree 7b339b2e), alternated new/base/new
source .devrun/setup.sh
rm -rf .devrun/base && mkdir -p .devrun/base && tar xf .devrun/base.tar -C .devrun/base
export INTERNVL_JAX_CACHE=$W/cache
nvidia-smi --query-gpu=timestamp,index,utilization.gpu --format=csv,noheader,nounits -lms 250 > $W/gpu-util.csv &
run() {  # name tree-dir
  local name=$1 dir=$2
  date -u; echo "== $name"
  (cd $dir && PYTHONPATH=/tmp/site:$(pwd) timeout 190 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads arena-c64 --time-limit 180 --result-dir $W/$name --work-dir $W/$name-work > $W/$name.log 2>&1)
  echo "rc $?"; sed -n '/## Servers/,/## Plan/p' $W/$name/e2e-summary.md | grep "^| InternVL"
  grep "^| InternVL" $W/$name/e2e-summary.md | sed -n '3,4p'
  mkdir -p $OUT/$name; cp $W/$name/e2e-summary.* $OUT/$name/ 2>/dev/null; cp $W/$name-work/logs/*/*server.log $OUT/$name/ 2>/dev/null
}
run new-dp2 .
run base-dp2 .devrun/base
run new-dp2-b .
date -u
kill %1; cp $W/gpu-util.csv $OUT/
