# session 17 call 1, one H200: the encoder LayerNorm kernel alone (norm_probe), in the encoder (bench encoder
# --norm all, both kernels in turn at each batch), and profiles of a 32-tile encode with each
source .devrun/setup.sh
date -u
timeout 200 python3 -m bench.norm_probe --preset InternVL3-1B --tiles 1,8,32 --sweep --out $OUT/norm_probe.json > $OUT/norm_probe.log 2>&1; echo "probe rc $?"; date -u
timeout 220 python3 -m bench encoder --preset InternVL3-1B --devices 1 --modes data --batches 1,8,32,64 --norm all --baseline none --repeats 7 --no-copy --out $OUT/encoder.json --plot $OUT/encoder.png > $OUT/encoder.log 2>&1; echo "encoder rc $?"; date -u
for n in xla pallas; do timeout 90 python3 -m bench profile --what encode --tiles 32 --norm $n --out $OUT/profile-$n > $OUT/profile-$n.log 2>&1; echo "profile $n rc $?"; done; date -u
grep -v "^ *$" $OUT/norm_probe.log | grep "tiles\|D=" | sort -t'(' -k1,1 | head -80
grep -A12 "^mode" $OUT/encoder.log
rm -f $OUT/profile-*/trace-*.json.gz
for n in xla pallas; do python3 - $OUT/profile-$n/profile-encode.json <<'PY'
import json,sys
p=json.load(open(sys.argv[1]))
print(sys.argv[1], "device us per call", round(p["device_us_per_call"],1), "kernels", p["kernels_per_call"])
for k in p["top_kernels"][:12]: print("  %-70s %6.1f per call %9.1f us %7.1f each" % (k["kernel"][:70], k["per_call"], k["us_per_call"], k["us_each"]))
PY
done
