#!/usr/bin/env bash
# Eleventh session, second call: the candidates of sweep_2026-12-02c.sh on another seed and on the split of the
# 301 entries of before (.sw11/d301.json + the 160 corrective entries as --extra, training only). Made here with
#   mkdir -p .sw11 && python3 -c "import json; d = json.load(open('tu_dataset.json')); \
#     json.dump(d[:301], open('.sw11/d301.json', 'w'), ensure_ascii=False); \
#     json.dump(d[301:], open('.sw11/x160.json', 'w'), ensure_ascii=False)"
# and carried with .gg2 and .whs.
set -u
run() { timeout 570 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
C1="K=30,pe=0,bs=1,epochs=0.8,lr=1e-3,lpr=4"; C2="K=30,pe=0,bs=1,epochs=0.8,lr=3e-3"
C3="K=30,pe=0,bs=2,epochs=0.8,lr=3e-3,lpr=4"; C5="K=30,pe=0,bs=1,epochs=0.8,lr=1.5e-3,lpr=4"
C6="K=30,pe=0,bs=1,epochs=1,lr=3e-3"; C4="K=30,pe=0,bs=1,epochs=0.9,lr=1.5e-3,lpr=4"
C7="K=30,pe=0,bs=2,epochs=0.9,lr=2e-3,lpr=4"; C8="K=30,pe=0,bs=1,epochs=0.8,lr=2e-3,lpr=4"
OLD=(--dataset .sw11/d301.json --extra .sw11/x160.json)
run s7 "c1s7:$C1,seed=7" "c2s7:$C2,seed=7" "c3s7:$C3,seed=7" "c5s7:$C5,seed=7" "c6s7:$C6,seed=7" &
run old "c1old:$C1" "c2old:$C2" "c3old:$C3" "c5old:$C5" "c6old:$C6" "${OLD[@]}" &
run new "c4:$C4" "c7:$C7" "c8:$C8" "c5:$C5" "c8s7:$C8,seed=7" &
run old2 "c4old:$C4" "c7old:$C7" "c8old:$C8" "c1old_s7:$C1,seed=7" "c4old_s7:$C4,seed=7" "${OLD[@]}" &
wait
