# session 13 call 2, one H200: as call 1, the workers now keep freed memory and are taken last in, first out
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader -lms 250 > $W/smi.csv 2>&1 &
SMI=$!
python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single "thread:--preprocess-backend thread" "process2:--preprocess-backend process" --workloads arena-c64 ttft-7tile --time-limit 480 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo rc $?; date -u
kill $SMI
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null; cp $W/smi.csv $W/r.log $OUT/r/
grep "^| InternVL" $W/r/e2e-summary.md
tail -5 $W/r.log
