#!/usr/bin/env bash
# Twelfth session: ORPO inside the SFT (orpo=beta; the entries' `rejected` answers ride in their rows, task 24)
# on top of the CPU defaults (C4: one row a step, 0.9 epochs, lr 1.5e-3, LoRA+ 4), on the split of now and on the
# 301 entries of before (.sw11/d301.json + .sw11/x160.json, made as in sweep_2026-12-02d.sh), carried with .gg2
# and .whs after `bash bench/quality_on_gpu.sh receive` (carry .gg1).
set -u
run() { timeout 570 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
C4="K=30,pe=0,bs=1,epochs=0.9,lr=1.5e-3,lpr=4"
OLD=(--dataset .sw11/d301.json --extra .sw11/x160.json)
run a "o0:$C4" "o03:$C4,orpo=0.3" "o1:$C4,orpo=1" "o3:$C4,orpo=3" "o10:$C4,orpo=10" &
run b "o05:$C4,orpo=0.5" "o2:$C4,orpo=2" "o5:$C4,orpo=5" "o1s7:$C4,orpo=1,seed=7" "o3s7:$C4,orpo=3,seed=7" &
run c "o1old:$C4,orpo=1" "o3old:$C4,orpo=3" "o10old:$C4,orpo=10" "o5old:$C4,orpo=5" "${OLD[@]}" &
run d "o1e1:$C4,orpo=1,epochs=1" "o3e1:$C4,orpo=3,epochs=1" "o3lr2:$C4,orpo=3,lr=2e-3" "o2old:$C4,orpo=2" "o0old:$C4" "${OLD[@]}" &
wait
