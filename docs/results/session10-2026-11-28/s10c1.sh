# session 10 call 1, 2x H200: arena-c64 InternVL3-1B -dp 2, base tree (4041683) then the new tree (async read-back, image-size tile bucket, 1.5x prefill lengths), then the new tree with the engine-thread sampler
source .devrun/setup.sh
rm -rf .devrun/base && mkdir -p .devrun/base && tar xf .devrun/base.tar -C .devrun/base
export INTERNVL_JAX_CACHE=$W/cache
run() {  # name tree-dir extra-env...
  local name=$1 dir=$2; shift 2
  date -u; echo "== $name"
  local pp=/tmp/site:$(cd $dir && pwd); [ -n "$SAMPLER" ] && pp=$PWD/.devrun/sampler:$pp
  (cd $dir && env "$@" PYTHONPATH=$pp timeout 240 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads arena-c64 --time-limit 230 --result-dir $W/$name --work-dir $W/$name-work > $W/$name.log 2>&1)
  echo "rc $?"; grep -A3 "^| preset | workload | config | status" $W/$name/e2e-summary.md | tail -1; grep -A3 "client TTFT" $W/$name/e2e-summary.md | tail -1; grep -A3 "duration s" $W/$name/e2e-summary.md | tail -1
}
run base-dp2 .devrun/base X=1
run new-dp2 . X=1
#SAMPLER=1 run new-dp2-sampled . ENGINE_SAMPLES=$W/samples
date -u
cp $W/samples.* $OUT/ 2>/dev/null
cd $W && tar czf $OUT/s10c1.tgz --exclude='cache' base-dp2 new-dp2 new-dp2-sampled *.log */logs 2>/dev/null; ls -la $OUT
