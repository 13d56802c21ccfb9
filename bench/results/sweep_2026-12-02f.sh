#!/usr/bin/env bash
# Twelfth session, second call: ORPO with more SFT epochs (the margin of perplexity that DPO had after 2 epochs),
# on both splits, as sweep_2026-12-02e.sh (.sw11 carried with .gg2 and .whs). Short: the session's device time
# was nearly spent.
set -u
run() { timeout 290 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
C4="K=30,pe=0,bs=1,lr=1.5e-3,lpr=4"
OLD=(--dataset .sw11/d301.json --extra .sw11/x160.json)
run f "e125o1:$C4,epochs=1.25,orpo=1" "e125o2:$C4,epochs=1.25,orpo=2" &
run g "e15o1:$C4,epochs=1.5,orpo=1" &
run h "e125o1old:$C4,epochs=1.25,orpo=1" "e125o2old:$C4,epochs=1.25,orpo=2" "${OLD[@]}" &
run i "e15o1old:$C4,epochs=1.5,orpo=1" "${OLD[@]}" &
wait
