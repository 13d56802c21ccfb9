#!/usr/bin/env bash
# Thirteenth session, task 24, fourth call: where does the probe stop without the time budget? ORPO for 2-3 epochs
# on both kinds of rejected answers (the old ones and the minimal pairs of .sw13/dmin.json; rebuild it from
# bench/results/tarea24_pares_minimos/rechazadas_minimas.json). Carry .gg2, .whs and .sw13 after a `receive`.
set -u
run() { timeout 470 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
C4="K=30,pe=0,bs=1,lr=1.5e-3,lpr=4"
MIN=(--dataset .sw13/dmin.json)
run a "o3e3:$C4,orpo=3,epochs=3" &
run b "m3e3:$C4,orpo=3,epochs=3" "${MIN[@]}" &
run c "md1o3e2:$C4,dup=1,orpo=3,epochs=2" "${MIN[@]}" &
run d "o10e3:$C4,orpo=10,epochs=3" &
wait
