#!/usr/bin/env bash
# Set up (idempotent), then generate text with the default language model served at half of its
# expert memory by a Parameter Committee, and print the committee statistics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
model=models/pcmoe-lm
if [ ! -f "$model/config.json" ]; then  # only before the default model was first trained
  model=data/tiny-demo
  echo "note: $model is a tiny random checkpoint (models/pcmoe-lm is not in this checkout)" >&2
  [ -f "$model/config.json" ] || .venv/bin/python -c "
from pathlib import Path; from pcmoe.testing import make_checkpoint, make_tokenizer
p = Path('$model'); t = make_tokenizer(p); make_checkpoint('qwen3_moe', p, vocab_size=len(t))" >/dev/null
fi
exec .venv/bin/pcmoe generate --model "$model" --budget 50%experts --policy committee \
  --prompt "${1:-The module provides functions for}" --max-tokens "${2:-80}" \
  --temperature 0.8 --top-p 0.95 --seed-sample 0   # greedy decoding loops on a model this small
