#!/usr/bin/env bash
# Every measured number the docs show, in the order they were produced (hours on 2 cores).
# Each step writes its results atomically and can be rerun alone; nothing here is part of CI.
#
#   bash scripts/reproduce_docs.sh            # all steps
#   bash scripts/reproduce_docs.sh observations knobs   # some steps
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
LM=models/pcmoe-lm
VIT=models/pcmoe-vit
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(observations knobs warm-users memory-limit bench)

for step in "${steps[@]}"; do
  echo "== $step" >&2
  case "$step" in
    observations)  # paper §1 on both shipped models -> docs/observations/
      $PY scripts/observations.py --model $VIT --out docs/observations/vision --threads 2
      $PY scripts/observations.py --model $LM --data $LM/eval/heldout.txt --out docs/observations/lm --threads 2 ;;
    knobs)         # the committee's own knobs at 50 % of expert memory -> docs/results/committee_knobs.md
      $PY benchmarks/committee_knobs.py --model $LM --budget 50%experts --out results/committee_knobs
      mkdir -p docs/results && cp results/committee_knobs/committee_knobs.{md,json} docs/results/ ;;
    warm-users)    # per-user warm committees vs one shared committee -> docs/results/warm_users.md
      $PY benchmarks/warm_users.py --model $LM --budget 50%experts \
        --data $LM/eval/pydoc.txt $LM/eval/linuxdoc.txt $LM/eval/stdlib.txt --docs-per-user 8 --out results/warm_users
      mkdir -p docs/results && cp results/warm_users/warm_users.{md,json} docs/results/ ;;
    memory-limit)  # a few-hundred-MB checkpoint inside a cgroup v1 limit -> docs/results/memory_limit.md
      $PY benchmarks/memory_limit.py --tokenizer $LM --data $LM/eval/heldout.txt --threads 2 --trials 3 \
        --out results/memory_limit
      mkdir -p docs/results && cp results/memory_limit/memory_limit.{md,json} docs/results/ ;;
    bench)         # the trade-off study and the peers -> BENCHMARKS.md, docs/benchmarks/*.png
      .venv/bin/pcmoe bench --model $LM --vision $VIT --eval-tokens 24576 --markdown BENCHMARKS.md --scaling ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
