# session 9 call 1, one H100: encoder probe (qkv split, LN one-pass), profiles (encode 1/32 tiles, 1B decode 1 slot ctx 512, 64 slots ctx 2048), bench encoder
source .devrun/setup.sh
date -u
timeout 150 python3 .devrun/encprobe.py > $W/encprobe.log 2>&1; cp $OUT/encprobe.json $W/ 2>/dev/null; cat $W/encprobe.log | grep -v Warning | tail -40
for t in 1 32; do
  timeout 90 python3 -m bench profile --what encode --preset InternVL3-1B --tiles $t --out $W/prof-enc-$t > $W/prof-enc-$t.log 2>&1; echo "== enc $t rc $?"; head -40 $W/prof-enc-$t.log
done
timeout 90 python3 -m bench profile --what decode --preset InternVL3-1B --slots 1 --context 512 --out $W/prof-dec-1 > $W/prof-dec-1.log 2>&1; echo "== dec 1 rc $?"; head -45 $W/prof-dec-1.log
timeout 100 python3 -m bench profile --what decode --preset InternVL3-1B --slots 64 --context 2048 --out $W/prof-dec-64 > $W/prof-dec-64.log 2>&1; echo "== dec 64 rc $?"; head -45 $W/prof-dec-64.log
date -u
timeout 120 python3 -m bench encoder --preset InternVL3-1B --batches 1,8,32,64 --devices 1 --repeats 5 --out $W/encoder.json > $W/encoder.log 2>&1; echo "== encoder rc $?"; tail -25 $W/encoder.log
date -u
cd $W && find . -name "*.json.gz" -o -name "*.pb" -o -name "*.trace*" | xargs rm -f; tar czf $OUT/s9c1.tgz --exclude='*.pb' --exclude='*trace*' . 2>/dev/null; ls -la $OUT
