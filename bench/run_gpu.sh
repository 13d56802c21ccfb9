#!/bin/bash
# On the GPU machine, from the repo root (.whl and .gpu carried). Usage: bash bench/run_gpu.sh PART
#   pipeline  02 -> 04 through Unsloth in 4-bit on a Llama-3.2-1B-shaped random model (+ generation bench)
#   train     anchors and our training path, one after the other, same data; prints a table
#   pair      the same on a 2-GPU machine: anchors on GPU 0 and ours on GPU 1 at the same time
set -u
# Results and logs go to RES; only latest.json and one archive come back in $OUT (few files travel back).
RES=${RES:-/tmp/benchres}; mkdir -p "$RES"
# A machine kept warm between device calls keeps /tmp: results of an earlier call must not enter this call's summary.
# (Lanes of "pair" share their parent's folder: the parent empties it once, before starting them.)
[ -n "${NO_SUMMARY:-}" ] || rm -f "$RES"/*.json "$RES"/*.log
[ -n "${SKIP_SETUP:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
[ -d /tmp/llama32_1b_shape ] || python3 .gpu/anchor_bench.py make > "$OUT/make.log" 2>&1 || { tail "$OUT/make.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "$1" in
pipeline)
  q=$(mktemp --suffix .json)
  python3 - "$q" <<'PY'
import json, sys
json.dump([{"pregunta": "¿De dónde proviene el oxígeno que liberan las plantas?", "palabras_clave": ["agua"]},
           {"pregunta": "¿Respiran las plantas?"}, {"pregunta": "¿Necesita oscuridad el ciclo de Calvin?"}],
          open(sys.argv[1], "w"), ensure_ascii=False)
PY
  set -o pipefail
  { python3 02_load_model.py --model /tmp/llama32_1b_shape --backend unsloth --output-dir /tmp/salida \
      --questions "$q" --max-new-tokens 32 \
    && python3 03_train_model.py --output-dir /tmp/salida --max-steps 6 --logging-steps 1 --save-steps 3 \
    && python3 04_inference_and_export.py --output-dir /tmp/salida --gguf q8_0; } 2>&1 | grep -v "it/s\]" > "$OUT/pipeline.log"
  echo "pipeline rc=$?"; tail -25 "$OUT/pipeline.log"
  cp /tmp/salida/run.json "$OUT/run_gpu.json" 2>/dev/null
  python3 - <<'PY'
import json
m = json.load(open("/tmp/salida/run.json"))
print("stages:", {k: v["status"] for k, v in m["stages"].items()}, "backend:", m["model"]["backend"],
      "4bit:", m["model"]["load_in_4bit"], "precision:", m["settings"]["precision"])
print("train:", {k: m["stages"]["train"]["metrics"][k] for k in ("global_step", "final_loss", "tokens_per_second", "fused_lm_head")})
e = m["stages"]["export"]; print("merge:", e["merge"]["merged_onto"], e["merge"]["verification"])
print("gguf:", [(g["type"], g["bytes"], g.get("verification")) for g in e.get("gguf", [])])
PY
  [ -n "${SKIP_GEN:-}" ] || timeout 240 python3 bench/bench_generation.py --model /tmp/llama32_1b_shape --device cuda > "$OUT/gen_bench.log" 2>&1
  echo "gen bench rc=$?"; tail -8 "$OUT/gen_bench.log"
  ;;
pair)
  # Two lanes at once on a 2-GPU machine: anchors on GPU 0, ours on GPU 1 (separate cards, same call).
  # Usage: bench/run_gpu.sh pair "SPEC" ... -- "SPEC" ...
  shift; lane0=(); lane1=(); side=0
  for spec in "$@"; do
    if [ "$spec" = -- ]; then side=1; continue; fi
    if [ $side = 0 ]; then lane0+=("$spec"); else lane1+=("$spec"); fi
  done
  CUDA_VISIBLE_DEVICES=0 NO_SUMMARY=1 SKIP_SETUP=1 bash "$0" train "${lane0[@]}" > "$RES/lane0.txt" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 NO_SUMMARY=1 SKIP_SETUP=1 bash "$0" train "${lane1[@]}" > "$RES/lane1.txt" 2>&1 &
  wait
  grep -h "^==\|^RESULT\|Error" "$RES/lane0.txt" "$RES/lane1.txt" | cut -c1-300
  python3 bench/summarize_gpu.py "$RES" && cp "$RES/latest.json" "$OUT/latest.json"
  tar czf "$OUT/bench_logs.tgz" -C "$RES" .
  ;;
train)
  # Each spec: "anchor MODE TIMEOUT [VAR=value ...]" (../shared/gpu/anchor_bench.py: BATCH GC ATTN N_EX WARM)
  #        or: "ours NAME TIMEOUT [VAR=value ...]"   (bench/bench_gpu_train.py: ENGINE LOAD4 LOSS COMPILE ...)
  # A spec that could run past DEADLINE seconds after the start is skipped, so the summary and the archive
  # are always written before the device call's own limit (600 s) kills everything.
  shift
  for spec in "$@"; do
    set -- $spec
    kind=$1; name=$2; tmo=$3; shift 3
    if [ $(( SECONDS + tmo )) -gt "${DEADLINE:-560}" ]; then echo "== $kind $name skipped (deadline)"; continue; fi
    log="$RES/${kind}_${name}.log"
    t0=$(date +%s)
    if [ "$kind" = anchor ]; then
      ( cd .gpu && env OUT="$RES" N_EX=2400 WARM=4 GC=false "$@" timeout "$tmo" python3 anchor_bench.py "${name%%.*}" ) > "$log" 2>&1
    else
      env OUT="$RES" "$@" timeout "$tmo" python3 bench/bench_gpu_train.py "$name" > "$log" 2>&1
    fi
    rc=$?
    echo "== $kind $name rc=$rc $(( $(date +%s) - t0 ))s"; grep -E "^RESULT" "$log" | cut -c1-400; [ $rc = 0 ] || tail -4 "$log"
  done
  # REF_CURVE: a stored afinar_curve_ref.json (same data, seed and batch) to compare this call's curve_ours with,
  # when the slow reference path does not fit in the call.
  [ -n "${REF_CURVE:-}" ] && cp "$REF_CURVE" "$RES/afinar_curve_ref.json"
  if [ -z "${NO_SUMMARY:-}" ]; then
    python3 bench/summarize_gpu.py "$RES" && cp "$RES/latest.json" "$OUT/latest.json"
    tar czf "$OUT/bench_logs.tgz" -C "$RES" .
  fi
  ;;
esac
