#!/usr/bin/env bash
# Thirteenth session, task 24, third call: the corrective entries twice per epoch (dup=1) at the token cost of
# today's default (0.9 epochs, 89 359 tokens), against the default with another seed. Plain SFT, tu_dataset.json.
# Carry .gg2 and .whs right after a `receive` call with .gg1.
set -u
run() { timeout 570 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
C4="K=30,pe=0,bs=1,lr=1.5e-3,lpr=4"
run a "d1e06:$C4,dup=1,epochs=0.6" "d1e067:$C4,dup=1,epochs=0.67" "d1e075:$C4,dup=1,epochs=0.75" &
run b "o0s7:$C4,epochs=0.9,seed=7" "d1e067s7:$C4,dup=1,epochs=0.67,seed=7" "d1e08:$C4,dup=1,epochs=0.8" &
run c "d1e067lr2:$C4,dup=1,epochs=0.67,lr=2e-3" "d1e067lr1:$C4,dup=1,epochs=0.67,lr=1e-3" "o0e12:$C4,epochs=1.2" &
wait
