# session 13 call 5, one H200: arena-c64 InternVL3-1B, base 5d872db vs the working tree (image-token positions found in add_request's thread, not the engine's); the server process's page faults sampled each second
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
( while true; do for p in $(pgrep -f "m serve --model"); do echo "$(date +%s.%N) $p $(cut -d' ' -f10,12,14,15 /proc/$p/stat)"; done; sleep 1; done ) > $W/faults.txt 2>/dev/null &
SAMPLER=$!
date -u
( cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) python3 -c "from bench.common import source_digest; print('base source', source_digest())" && PYTHONPATH=/tmp/site:$(pwd) python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads arena-c64 --time-limit 200 --result-dir $W/base --work-dir $W/base-work > $W/base.log 2>&1 )
echo "base rc $?"; date -u
python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single --workloads arena-c64 --time-limit 200 --result-dir $W/new --work-dir $W/new-work > $W/new.log 2>&1
echo "new rc $?"; date -u
kill $SAMPLER
for r in base new; do mkdir -p $OUT/$r; cp $W/$r/e2e-summary.* $OUT/$r/ 2>/dev/null; cp $W/$r-work/logs/*/*server.log $OUT/$r/ 2>/dev/null; echo "== $r"; grep "^| InternVL" $W/$r/e2e-summary.md; done
cp $W/faults.txt $OUT/
