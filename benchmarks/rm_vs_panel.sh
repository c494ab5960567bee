#!/usr/bin/env bash
# Reward model vs the panel that labelled its data (issue: RM held-out accuracy within 5 points of the
# panel's inter-labeler agreement). Samples K=4 replies from an SFT model on fresh train prompts and on
# held-out prompts, has a simulated panel of 5 rule labelers rank both, trains the RM on the train
# tasks and evaluates it on the held-out ones; `rm eval` prints the labelers' agreement on those
# same held-out pairs next to the RM's accuracy.
#
#   bash benchmarks/rm_vs_panel.sh runs/demo/sft runs/rm-panel                 # the demo's tiny SFT model
#   bash benchmarks/rm_vs_panel.sh runs/smol/sft runs/rm-panel-smol lora       # a LoRA RM on SmolLM2
set -euo pipefail
SFT=${1:-runs/demo/sft}
OUT=${2:-runs/rm-panel}
LORA=${3:-}
PER_FAMILY=${PER_FAMILY:-64}
HELD_PER_FAMILY=${HELD_PER_FAMILY:-16}
STEPS=${STEPS:-400}
PANEL="panel:rule*5:temperature=0.5"
mkdir -p "$OUT"
chatforge sample --model "$SFT" --prompts "tasks:$PER_FAMILY:21" --k 4 --max-new-tokens 32 --batch-size 16 \
    --out "$OUT/train_tasks.jsonl"
chatforge sample --model "$SFT" --prompts "tasks-heldout:$HELD_PER_FAMILY:22" --k 4 --max-new-tokens 32 \
    --batch-size 16 --out "$OUT/held_tasks.jsonl"
chatforge label --tasks "$OUT/train_tasks.jsonl" --labeler "$PANEL" --per-task 0 --out "$OUT/train_cmp.jsonl"
chatforge label --tasks "$OUT/held_tasks.jsonl" --labeler "$PANEL" --per-task 0 --out "$OUT/held_cmp.jsonl"
EXTRA=()
if [ -n "$LORA" ]; then
    EXTRA=(--set lora.enabled=true --set train.lr=1e-3 --set data.aggregate=bradley_terry --set train.seq_len=256)
fi
chatforge rm train --model "$SFT" --data "$OUT/train_cmp.jsonl" --set data.val_fraction=0 \
    --set "train.max_steps=$STEPS" --set train.warmup_steps=4 --set train.eval_every=0 \
    --set "train.checkpoint_every=$STEPS" "${EXTRA[@]}" --out "$OUT/rm"
chatforge rm eval --model "$OUT/rm" --data "$OUT/held_cmp.jsonl" --out "$OUT/rm/eval"
