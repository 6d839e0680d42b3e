# session 9 call 3, one H100: encoder base (74ac770) vs new (separate q/k/v params, odd batches padded, encode without dot merging) vs new with merging; profiles of new at 1 and 8 tiles
source .devrun/setup.sh
date -u
E="python3 -m bench encoder --preset InternVL3-1B --devices 1 --baseline none --repeats 5 --no-copy --batches 1,2,4,8,32,64"
for r in 1 2; do
  (cd .devrun/base && PYTHONPATH=/tmp/site:$(pwd) timeout 90 $E --out $W/enc-base-$r.json > $W/enc-base-$r.log 2>&1); echo "== base $r"; grep -A8 "^mode" $W/enc-base-$r.log | cut -c1-75
  timeout 90 $E --out $W/enc-new-$r.json > $W/enc-new-$r.log 2>&1; echo "== new $r"; grep -A8 "^mode" $W/enc-new-$r.log | cut -c1-75
  (cd .devrun/nomerge && PYTHONPATH=/tmp/site:$(pwd) timeout 90 $E --out $W/enc-merge-$r.json > $W/enc-merge-$r.log 2>&1); echo "== new, merging $r"; grep -A8 "^mode" $W/enc-merge-$r.log | cut -c1-75
done
date -u
for t in 1 8; do
  timeout 80 python3 -m bench profile --what encode --preset InternVL3-1B --tiles $t --out $W/prof-enc-$t > $W/prof-enc-$t.log 2>&1; echo "== enc $t rc $?"; head -12 $W/prof-enc-$t.log
done
date -u
cd $W && rm -f */trace-*; tar czf $OUT/s9c3.tgz . 2>/dev/null; ls -la $OUT
