# session 10 call 4, 2x H200: the committed-to-be tree's -dp 2 arena-c64 with GPU utilisation sampled; then one GPU: base (4041683) vs new, arena-c64 and ttft-7tile
source .devrun/setup.sh
rm -rf .devrun/base && mkdir -p .devrun/base && tar xf .devrun/base.tar -C .devrun/base
export INTERNVL_JAX_CACHE=$W/cache
date -u; echo "== new dp2 + utilisation"
nvidia-smi --query-gpu=timestamp,index,utilization.gpu --format=csv,noheader,nounits -lms 250 > $W/util.csv &
SMI=$!
timeout 200 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads arena-c64 --time-limit 190 --result-dir $W/dp2 --work-dir $W/dp2-work > $W/dp2.log 2>&1
echo "rc $?"; kill $SMI; sed -n '/## Servers/,/## Plan/p' $W/dp2/e2e-summary.md | grep "^| InternVL"
grep -h "ready: serving\|received SIGTERM" $W/dp2-work/logs/*/*server.log
python3 - <<'PY'
import collections, os
W = os.environ["W"]
per = collections.defaultdict(list)
for line in open(f"{W}/util.csv"):
    try:
        stamp, index, util = [x.strip() for x in line.split(",")]
        per[(stamp[11:19], index)].append(float(util))
    except ValueError:
        pass
seconds = sorted({k[0] for k in per})
for s in seconds:
    print(s, " ".join(f"{sum(per[(s, i)]) / len(per[(s, i)]):5.1f}" for i in ("0", "1") if per.get((s, i))))
PY
run1() {  # name tree
  local name=$1 dir=$2
  date -u; echo "== $name"
  (cd $dir && PYTHONPATH=/tmp/site:$(pwd) timeout 170 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads arena-c64 ttft-7tile --time-limit 160 --result-dir $W/$name --work-dir $W/$name-work > $W/$name.log 2>&1)
  echo "rc $?"; sed -n '/## Servers/,/## Plan/p' $W/$name/e2e-summary.md | grep "^| InternVL"
}
run1 base-single .devrun/base
run1 new-single .
date -u
cd $W && tar czf $OUT/s10c4.tgz --exclude='cache' dp2 base-single new-single util.csv *-work/logs *.log 2>/dev/null; ls -la $OUT
