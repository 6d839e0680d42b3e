# session 19 call 2 moved (H100 refused twice): the GELU probe alone on one H200
source .devrun/setup.sh
date -u
timeout 160 python3 docs/results/session19-2026-12-07/gelu_probe.py $OUT/gelu_probe.json > $OUT/gelu_probe.log 2>&1; echo "gelu rc $?"; date -u
grep -v Warning $OUT/gelu_probe.log | tail -20
