#!/usr/bin/env bash
# One command for a bare GPU machine without network: every GPU figure the project lacks, in <= 8 minutes.
#
#   here (with network):   bash bench/gpu_proof.sh --prepare      # wheels + tokenizer into .whl/ (< 64 MiB)
#   there (GPU, offline):  bash bench/gpu_proof.sh OUT_DIR         # installs .whl/, runs bench/gpu_proof.py
#   anywhere, no GPU:      bash bench/gpu_proof.sh OUT_DIR --dry-run   # the same stages on the CPU, tiny shapes
#
# --prepare downloads the pinned wheels the GPU image lacks or has at another version (bitsandbytes,
# transformers, peft, ijson; requirements.txt's pins) for CPython 3.12 x86-64, and copies the built-in
# model's ChatML tokenizer beside them. On the GPU machine they are installed into /tmp/site (no
# network, no dependencies resolved: the image holds the rest) and the driver writes
# OUT_DIR/gpu_proof.json and one log per stage (bench/gpu_proof.py says what each stage measures).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

pin() { grep -E "^$1==" requirements.txt | cut -d' ' -f1; }

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p .whl
  for pkg in bitsandbytes transformers peft ijson; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$(pin $pkg)"
  done
  "$PY" - <<'PYEOF'
import shutil, sys
sys.path.insert(0, ".")
from pathlib import Path
from ultimate_trainer.model.loading import ensure_builtin_cache
src = ensure_builtin_cache(Path("models/cache"))
dst = Path(".whl/tokenizer"); dst.mkdir(parents=True, exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).is_file():
        shutil.copy2(src / name, dst / name)
PYEOF
  du -sh .whl
  exit 0
fi

OUT=${1:?usage: bench/gpu_proof.sh OUT_DIR [--dry-run] | --prepare}
shift
mkdir -p "$OUT"
if [[ " $* " != *" --dry-run "* ]] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
TOK=()
[[ -f .whl/tokenizer/tokenizer.json ]] && TOK=(--tokenizer .whl/tokenizer)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
"$PY" bench/gpu_proof.py --out "$OUT" "${TOK[@]}" "$@" 2>&1 | tee "$OUT/gpu_proof.log"
