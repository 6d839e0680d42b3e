# session 17 call 2, one H200: the LayerNorm and GELU kernels alone (kernel_probe, sweep), in the encoder (bench
# encoder --kernels all, in turn at each batch), and profiles of a 32-tile encode with each
source .devrun/setup.sh
date -u
timeout 240 python3 -m bench.kernel_probe --preset InternVL3-1B --tiles 1,8,32 --sweep --out $OUT/kernel_probe.json > $OUT/kernel_probe.log 2>&1; echo "probe rc $?"; date -u
timeout 200 python3 -m bench encoder --preset InternVL3-1B --devices 1 --modes data --batches 1,8,32,64 --kernels all --baseline none --repeats 7 --no-copy --out $OUT/encoder.json --plot $OUT/encoder.png > $OUT/encoder.log 2>&1; echo "encoder rc $?"; date -u
for n in xla pallas; do timeout 80 python3 -m bench profile --what encode --tiles 32 --kernels $n --out $OUT/profile-$n > $OUT/profile-$n.log 2>&1; echo "profile $n rc $?"; done; date -u
grep "planned\|xla\|failed" $OUT/kernel_probe.log | head -30
for k in layer_norm gelu; do for t in "  1 tiles" "  8 tiles" " 32 tiles"; do grep "$k $t" $OUT/kernel_probe.log | sort -k8 -n | head -3; done; done
grep -A12 "^mode" $OUT/encoder.log
python3 -c "import json; [print(r['kernels'], r['tiles'], round(r['tiles_per_s'],1), r['max_abs_diff_vs_first_over_max']) for r in json.load(open('$OUT/encoder.json'))['results']]"
rm -f $OUT/profile-*/trace-*.json.gz $OUT/profile-*/hlo-*.txt
for n in xla pallas; do head -12 $OUT/profile-$n.log; python3 - $OUT/profile-$n/profile-encode.json <<'PY'
import json,sys
p=json.load(open(sys.argv[1]))
for k in p["top_kernels"][:9]: print("  %-60s %6.1f per call %9.1f us %7.1f each" % (k["kernel"][:60], k["per_call"], k["us_per_call"], k["us_each"]))
PY
done
