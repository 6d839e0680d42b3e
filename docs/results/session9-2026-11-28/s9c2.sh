# session 9 call 2, one H100: encoder A/B base (74ac770) vs new (q/k/v GEMMs with vector biases, odd batches padded per tile); profiles of new; LN flags; decode cuBLAS vs Triton GEMMs
source .devrun/setup.sh
date -u
E="python3 -m bench encoder --preset InternVL3-1B --devices 1 --baseline none --repeats 5 --no-copy"
for r in 1 2; do
  (cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) timeout 100 $E --batches 1,2,4,8,32,64 --out $W/enc-base-$r.json > $W/enc-base-$r.log 2>&1); echo "== base $r"; grep -A8 "^mode" $W/enc-base-$r.log
  timeout 100 $E --batches 1,2,4,8,32,64 --out $W/enc-new-$r.json > $W/enc-new-$r.log 2>&1; echo "== new $r"; grep -A8 "^mode" $W/enc-new-$r.log
done
date -u
for t in 1 32; do
  timeout 80 python3 -m bench profile --what encode --preset InternVL3-1B --tiles $t --out $W/prof-enc-$t > $W/prof-enc-$t.log 2>&1; echo "== enc $t rc $?"; head -12 $W/prof-enc-$t.log
done
timeout 80 python3 .devrun/lnflags.py > $W/lnflags.log 2>&1; cat $W/lnflags.log | grep -v Warn | tail -8
date -u
D="python3 -m bench decode --preset InternVL3-1B --batches 1,64 --contexts 2048 --prefill-lengths 1024 --baseline none --repeats 5"
timeout 100 $D --out $W/dec-default.json > $W/dec-default.log 2>&1; echo "== decode default"; grep -A4 "^batch" $W/dec-default.log
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false timeout 100 $D --out $W/dec-cublas.json > $W/dec-cublas.log 2>&1; echo "== decode cublas"; grep -A4 "^batch" $W/dec-cublas.log
date -u
cd $W && rm -f */trace-*; tar czf $OUT/s9c2.tgz . 2>/dev/null; ls -la $OUT
