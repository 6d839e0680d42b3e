# session 19 call 1 (H100 not lent at the time): the attention probe alone on one H200
source .devrun/setup.sh
date -u
timeout 250 python3 docs/results/session19-2026-12-07/attn_probe.py $OUT/attn_probe.json > $OUT/attn_probe.log 2>&1; echo "attn rc $?"; date -u
cat $OUT/attn_probe.log
