# session 10 call 3, 2x H200: new tree, -dp 2 arena-c64: images in the preprocessing threads (--image-processes 0) vs in processes (default) vs threads with a 0.5 ms GIL switch interval
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
run() {  # name config-spec extra-env...
  local name=$1 spec=$2; shift 2
  date -u; echo "== $name"
  env "$@" PYTHONPATH=$PWD/.devrun/sampler:$PYTHONPATH timeout 200 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs "$spec" --workloads arena-c64 --time-limit 190 --result-dir $W/$name --work-dir $W/$name-work > $W/$name.log 2>&1
  echo "rc $?"; sed -n '/## Servers/,/## Plan/p' $W/$name/e2e-summary.md | grep "^| InternVL"
}
run threads "dp2-threads:-dp 2 --image-processes 0" X=1
run processes "dp2:-dp 2" X=1
run threads-si "dp2-threads-si:-dp 2 --image-processes 0" SWITCH_INTERVAL=0.0005
date -u
cd $W && tar czf $OUT/s10c3.tgz --exclude='cache' threads processes threads-si *-work/logs *.log 2>/dev/null; ls -la $OUT
