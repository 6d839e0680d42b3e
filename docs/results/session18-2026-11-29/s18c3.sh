# session 18 call 3, one H200: what the GELU kernel compiles to (XLA's dump of the Triton kernel's PTX), and the kernel
# with its 1 / (1 + p|z|) as rsqrt squared and one Newton step (.devrun/variant, not committed) against main's, alone,
# alternating main / variant twice
source .devrun/setup.sh
date -u
XLA_FLAGS="--xla_dump_to=$W/dump" timeout 90 python3 -m bench.kernel_probe --preset InternVL3-1B --tiles 8 --kernels gelu --depth 1 --repeats 1 --out $W/x.json > $W/dump.log 2>&1; echo "dump rc $?"
ls $W/dump | wc -l; ls -S $W/dump | grep -i "ptx\|triton\|gelu" | head -20
mkdir -p $OUT/dump; for f in $(ls $W/dump | grep -i "ptx\|triton\|ttir\|ttgir" | head -20); do cp $W/dump/$f $OUT/dump/ 2>/dev/null; done
grep -l "gelu" $W/dump/* 2>/dev/null | head -10
for f in $(grep -l "gelu" $W/dump/*.ptx 2>/dev/null | head -2); do echo "== $f"; awk '/\.entry.*gelu/,/^}/' $f | grep -oE "^\s+[a-z][a-z0-9._]*" | sort | uniq -c | sort -rn | head -40; done
for round in 1 2; do for tree in main variant; do
  if [ $tree = main ]; then dir=.; else dir=.devrun/variant; fi
  (cd $dir && PYTHONPATH=/tmp/site:$(pwd) timeout 120 python3 -m bench.kernel_probe --preset InternVL3-1B --tiles 32,8 --kernels gelu --repeats 7 --out $OUT/probe-$tree-$round.json > $OUT/probe-$tree-$round.log 2>&1); echo "$tree $round rc $?"
  grep "pallas\|xla" $OUT/probe-$tree-$round.log
done; done
date -u
