#!/usr/bin/env bash
# Pre-train and fine-tune the demo model on one GPU (run from the repo root after the data steps in
# recipes/demo/README.md). Without STEPS, a 30-step probe measures the step time and the pre-training gets
# as many steps as fit in BUDGET_S seconds.
set -euo pipefail
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-330}
STEPS=${STEPS:-}
if [ -z "$STEPS" ]; then
  rm -rf build/demo/runs/probe
  $PY -m cpm4.cli pretrain -c recipes/demo/pretrain.toml --set train.steps=20 --set schedule.warmup_steps=5 \
    --set schedule.decay_share=0.0 --set 'checkpoint.dir="build/demo/runs/probe"' --set log.every=10 \
    --set log.eval_every=0 --set log.eval_batches=1 --set log.progress=false
  STEPS=$($PY -c "
import json
recs = [json.loads(line) for line in open('build/demo/runs/probe/metrics.jsonl')]
tps = [r['tokens_per_s'] for r in recs if 'loss' in r][-1]
print(int(min(4000, $BUDGET_S / (32 * 2048 / tps))) // 10 * 10)")
fi
echo "pre-training steps: $STEPS"
rm -rf build/demo/runs/pretrain build/demo/runs/sft
$PY -m cpm4.cli pretrain -c recipes/demo/pretrain.toml --set train.steps="$STEPS" --set log.progress=false
$PY -m cpm4.cli sft -c recipes/demo/sft.toml --set log.progress=false
