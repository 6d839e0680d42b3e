# session 16 call 5, one H200: base (HEAD 2026-11-29 = the engine-process commit) vs the tree (prefill length buckets 2,560 and 3,584), single-proc, arena-c64, same machine
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
( cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) python3 -c "from bench.common import source_digest; print('base source', source_digest())" && PYTHONPATH=/tmp/site:$(pwd) timeout 250 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single-proc --workloads arena-c64 --time-limit 240 --result-dir $W/base --work-dir $W/base-work > $W/base.log 2>&1 )
echo "base rc $?"; date -u
timeout 250 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single-proc --workloads arena-c64 --time-limit 240 --result-dir $W/new --work-dir $W/new-work > $W/new.log 2>&1
echo "new rc $?"; date -u
for r in base new; do mkdir -p $OUT/$r; cp $W/$r/e2e-summary.* $OUT/$r/ 2>/dev/null; cp $W/$r-work/logs/*/*server.log $OUT/$r/ 2>/dev/null; echo "== $r"; grep "^| InternVL" $W/$r/e2e-summary.md; grep -h "compiled .* buckets\|ready in" $W/$r-work/logs/*/*server.log | head -3; done
