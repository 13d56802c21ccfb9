#!/usr/bin/env bash
# Thirteenth session, task 24: ORPO with minimal-pair rejected answers (the correct answer with only the key claim
# flipped, .sw13/dmin.json) against the old, differently worded ones; and the corrective entries repeated through
# the stream (dup). Carry .gg2, .whs and .sw13 right after a `receive` call with .gg1.
set -u
run() { timeout 570 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
C4="K=30,pe=0,bs=1,epochs=0.9,lr=1.5e-3,lpr=4"
MIN=(--dataset .sw13/dmin.json)
run a "m1:$C4,orpo=1" "m3:$C4,orpo=3" "m10:$C4,orpo=10" "m30:$C4,orpo=30" "${MIN[@]}" &
run b "m2:$C4,orpo=2" "m5:$C4,orpo=5" "m3e1:$C4,orpo=3,epochs=1" "m3s7:$C4,orpo=3,seed=7" "${MIN[@]}" &
run c "o0:$C4" "d1:$C4,dup=1" "d1o1:$C4,dup=1,orpo=1" "d2:$C4,dup=2,epochs=0.7" &
run d "md1o3:$C4,dup=1,orpo=3" "md1o10:$C4,dup=1,orpo=10" "m10e07:$C4,orpo=10,epochs=0.7" "m5lr2:$C4,orpo=5,lr=2e-3" "${MIN[@]}" &
wait
