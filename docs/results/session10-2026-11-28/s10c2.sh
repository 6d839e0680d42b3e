# session 10 call 2, 2x H200: the new tree's -dp 2 arena-c64 with the engine-thread sampler (where the off-CPU time is)
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
PYTHONPATH=$PWD/.devrun/sampler:$PYTHONPATH ENGINE_SAMPLES=$W/samples timeout 280 python3 -m bench e2e --stop-timeout 10 --gpus 2 --presets InternVL3-1B --configs dp2 --workloads arena-c64 --time-limit 270 --result-dir $W/sampled --work-dir $W/sampled-work > $W/sampled.log 2>&1
echo "rc $?"; sed -n '/## Servers/,/## Plan/p' $W/sampled/e2e-summary.md | grep "^| InternVL"
date -u
for f in $W/samples.*; do s=$(head -1 $f); [ "$s" != "samples 0" ] && cp $f $OUT/; done
cd $W && tar czf $OUT/s10c2.tgz --exclude='cache' sampled sampled-work *.log 2>/dev/null; ls -la $OUT
