#!/usr/bin/env bash
# Thirteenth session, task 24, second call: the token contrast (tc: at each place where the minimal-pair wrong
# answer departs from the right one, the wrong token must lose to the right one), alone, with ORPO and with the
# corrective entries repeated (dup). Carry .gg2, .whs and .sw13 right after a `receive` call with .gg1.
set -u
run() { timeout 570 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
C4="K=30,pe=0,bs=1,epochs=0.9,lr=1.5e-3,lpr=4"
MIN=(--dataset .sw13/dmin.json)
run a "t03:$C4,tc=0.3" "t1:$C4,tc=1" "t3:$C4,tc=3" "t10:$C4,tc=10" "${MIN[@]}" &
run b "t1d1:$C4,tc=1,dup=1" "t3d1:$C4,tc=3,dup=1" "t3d1e07:$C4,tc=3,dup=1,epochs=0.7" "t1s7:$C4,tc=1,seed=7" "${MIN[@]}" &
run c "t1o1:$C4,tc=1,orpo=1" "t3o1:$C4,tc=3,orpo=1" "t3o3:$C4,tc=3,orpo=3" "t30:$C4,tc=30" "${MIN[@]}" &
run d "t1old:$C4,tc=1" "t3old:$C4,tc=3" "t10old:$C4,tc=10" "t3d1old:$C4,tc=3,dup=1" &
wait
