# session 19 call 1, one H100: cuDNN attention at InternViT's lengths (is the 1,025th token a whole extra block?),
# and the H100 targets re-measured with the current tree (encoder with the session-17 kernels; 1B decode)
source .devrun/setup.sh
date -u
timeout 190 python3 docs/results/session19-2026-12-07/attn_probe.py $OUT/attn_probe.json > $OUT/attn_probe.log 2>&1; echo "attn rc $?"; date -u
timeout 215 python3 -m bench encoder --preset InternVL3-1B --devices 1 --modes data --batches 1,8,32,64 --kernels all --baseline torch --repeats 7 --no-copy --out $OUT/encoder.json --plot $OUT/encoder.png > $OUT/encoder.log 2>&1; echo "encoder rc $?"; date -u
timeout 150 python3 -m bench decode --preset InternVL3-1B --batches 1,64 --contexts 2048 --baseline none --repeats 5 --out $OUT/decode1b.json > $OUT/decode1b.log 2>&1; echo "decode rc $?"; date -u
cat $OUT/attn_probe.log; tail -25 $OUT/encoder.log; tail -15 $OUT/decode1b.log
