#!/bin/bash
# The README demo (command 1's `cnnkit train`: resnet18 from scratch on data/flowers-mini, 64-px
# crops, 15 epochs) with extra flags, over seeds 0-4 (issue 12's demo target: mean validation
# accuracy >= 80 %). Prints each seed's best validation accuracy (what best.pt holds), the last
# epoch's, and the run's seconds. Fixed epochs: the accuracies do not depend on the machine's load.
#
#     benchmarks/demo_seeds.sh NAME [FLAGS...]      e.g. benchmarks/demo_seeds.sh bs8 --batch-size 8
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
for seed in 0 1 2 3 4; do
  run=$(mktemp -d "${TMPDIR:-/tmp}/cnnkit-demo-$name-$seed.XXXX")
  started=$(date +%s.%N)
  cnnkit train data/flowers-mini --arch resnet18 --weights none --epochs 15 --image-size 64 --save-dir "$run" \
    --force --no-progress --seed "$seed" "$@" >/dev/null 2>"$run.err" || { echo "$name $seed failed: $(tail -1 "$run.err")"; continue; }
  python - "$run/metrics.jsonl" "$name" "$seed" "$started" <<'PY'
import json, sys, time
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"{sys.argv[2]} {sys.argv[3]} val_best {max(r['val_acc'] for r in rows):.3f} "
      f"last {rows[-1]['val_acc']:.3f} secs {time.time() - float(sys.argv[4]):.0f}")
PY
  rm -rf "$run" "$run.err"
done
