# session 16 call 7, one H200: how busy the GPU is during single-proc arena-c64 (nvidia-smi utilization.gpu every 100 ms)
source .devrun/setup.sh
export INTERNVL_JAX_CACHE=$W/cache
date -u
nvidia-smi --query-gpu=timestamp,utilization.gpu,power.draw --format=csv,noheader,nounits -lms 100 > $W/util.csv 2>&1 &
SMI=$!
timeout 240 python3 -m bench e2e --stop-timeout 10 --gpus 1 --presets InternVL3-1B --configs single-proc --workloads arena-c64 --time-limit 230 --result-dir $W/r --work-dir $W/r-work > $W/r.log 2>&1
echo "rc $?"; date -u
kill $SMI
mkdir -p $OUT/r; cp $W/r/e2e-summary.* $OUT/r/ 2>/dev/null; cp $W/r-work/logs/*/*server.log $OUT/r/ 2>/dev/null; cp $W/util.csv $OUT/r/
grep "^| InternVL" $W/r/e2e-summary.md
python3 - <<'PY'
import csv, datetime, json, glob
def stamp(text, fmt):
    return datetime.datetime.strptime(text.strip(), fmt).timestamp()
samples = []
for row in csv.reader(open("/tmp/work/util.csv")):
    try:
        samples.append((stamp(row[0], "%Y/%m/%d %H:%M:%S.%f"), float(row[1]), float(row[2])))
    except (ValueError, IndexError):
        pass
run = json.load(open(glob.glob("/tmp/work/r-work/runs/*/single-proc-arena-c64.json")[0]))
end = stamp(run["date"], "%Y%m%d-%H%M%S") + 1
begin = end - 1 - run["duration"]
inside = [s for s in samples if begin + 1 <= s[0] <= end - 2]  # a second in from each end
util = [s[1] for s in inside]
print(f"run {run['duration']:.1f} s, {len(inside)} samples: GPU utilization mean {sum(util)/len(util):.1f}%, "
      f">=95%: {sum(u >= 95 for u in util)/len(util):.0%}, <50%: {sum(u < 50 for u in util)/len(util):.0%}, "
      f"power mean {sum(s[2] for s in inside)/len(inside):.0f} W")
PY
