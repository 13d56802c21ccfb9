#!/usr/bin/env bash
# The README's main command, stage by stage, timed, in a fresh clone (tasks 14 and 24; BENCHMARKS.md).
#
#   git clone /work/main /tmp/fresh && bash bench/time_main_command.sh /tmp/fresh --avx2
#
# --avx2 makes PyTorch and oneDNN use AVX2 only (no AVX-512, no AMX), as on most laptops: 03 then trains in fp32.
# --no-setup skips 01 (the lent GPU machine has no package index; bench/quality_on_gpu.sh installs there).
# Each stage's output goes to log_<stage>.txt in the clone; run it with nothing else on the CPU.
set -u
dir=${1:?uso: bash bench/time_main_command.sh CARPETA_DEL_CLON [--avx2] [--no-setup]}
stages=("bash 01_setup.sh" "python3 02_load_model.py" "python3 03_train_model.py" "python3 04_inference_and_export.py")
for flag in "${@:2}"; do
  case "$flag" in
    --avx2) export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ;;
    --no-setup) stages=("${stages[@]:1}") ;;
    *) echo "opción desconocida: $flag"; exit 2 ;;
  esac
done
cd "$dir" || exit 2
# Milliseconds in shell arithmetic: the lent GPU machine has no bc.
ms() { echo $(( $(date +%s%N) / 1000000 )); }
seconds() { printf '%d.%03d' $(( $1 / 1000 )) $(( $1 % 1000 )); }
total=0
for stage in "${stages[@]}"; do
  start=$(ms)
  $stage > "log_$(basename "${stage#* }" | cut -d. -f1).txt" 2>&1
  rc=$?
  took=$(( $(ms) - start ))
  total=$(( total + took ))
  echo "$stage: rc=$rc, $(seconds $took) s"
  [ $rc -eq 0 ] || exit $rc
done
echo "total: $(seconds $total) s"
