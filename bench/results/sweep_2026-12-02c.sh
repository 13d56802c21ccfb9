#!/usr/bin/env bash
# Eleventh session: fewer SFT tokens for the same held-out perplexity (issue 14): rows per step (bs) and LoRA+ (lpr).
# On the device, after `bash bench/quality_on_gpu.sh receive` (carry .gg1), with carry .gg2 and .whs:
#   bash bench/results/sweep_2026-12-02c.sh
set -u
R="K=30,pe=0"
run() { timeout 560 bash bench/quality_on_gpu.sh run --out "$OUT/$1.json" "${@:2}" > "$OUT/$1.log" 2>&1; }
run g1 "b4e125l6:$R,epochs=1.25,lr=6e-3" "b4e1l6:$R,epochs=1,lr=6e-3" "b4e1p4l3:$R,epochs=1,lr=3e-3,lpr=4" \
       "b4e1p8l2:$R,epochs=1,lr=2e-3,lpr=8" "b4e1p16l1:$R,epochs=1,lr=1e-3,lpr=16" "b4e08p8l2:$R,epochs=0.8,lr=2e-3,lpr=8" &
run g2 "b2e1l3:$R,bs=2,epochs=1,lr=3e-3" "b2e1l4:$R,bs=2,epochs=1,lr=4e-3" "b2e08l4:$R,bs=2,epochs=0.8,lr=4e-3" \
       "b2e1l6:$R,bs=2,epochs=1,lr=6e-3" "b2e08l3:$R,bs=2,epochs=0.8,lr=3e-3" "b2e075l5:$R,bs=2,epochs=0.75,lr=5e-3" &
run g3 "b2e1p4l2:$R,bs=2,epochs=1,lr=2e-3,lpr=4" "b2e08p4l2:$R,bs=2,epochs=0.8,lr=2e-3,lpr=4" \
       "b2e08p8l1:$R,bs=2,epochs=0.8,lr=1e-3,lpr=8" "b2e08p4l3:$R,bs=2,epochs=0.8,lr=3e-3,lpr=4" \
       "b2e06p4l2:$R,bs=2,epochs=0.6,lr=2e-3,lpr=4" "b2e08p16l1:$R,bs=2,epochs=0.8,lr=1e-3,lpr=16" &
run g4 "b1e1l2:$R,bs=1,epochs=1,lr=2e-3" "b1e08l2:$R,bs=1,epochs=0.8,lr=2e-3" "b1e08l3:$R,bs=1,epochs=0.8,lr=3e-3" \
       "b1e08p4l1:$R,bs=1,epochs=0.8,lr=1e-3,lpr=4" "b1e1l3:$R,bs=1,epochs=1,lr=3e-3" \
       "b1e06p4l15:$R,bs=1,epochs=0.6,lr=1.5e-3,lpr=4" &
wait
nvidia-smi --query-gpu=memory.used --format=csv > "$OUT/gpu.txt" 2>&1
