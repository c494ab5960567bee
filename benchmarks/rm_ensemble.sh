#!/usr/bin/env bash
# RLOO on a worst-case ensemble of reward-model seeds (Coste et al. 2024), at rl_table.sh's budget (issue 18):
# two more RMs on the --base demo round's comparisons (seeds 2 and 3, the round's RM recipe), then RLOO on
# ensemble:min of the three, then the same 988-prompt gold eval as the table (SFT replies from its cache).
#
#   bash benchmarks/rm_ensemble.sh [SFT_RUN] [RM_RUN] [OUT]    # defaults: the --base demo's runs, runs/exp14
set -uo pipefail
SFT=${1:-runs/demo-smol/sft}; RM=${2:-runs/demo-smol/loop/round-1/rm}; O=${3:-runs/exp14}
D=$(dirname "$RM")/comparisons.jsonl
mkdir -p "$O"
RMSET=(--set train.max_steps=60 --set train.batch_size=8 --set train.seq_len=256 --set train.eval_every=0
       --set train.checkpoint_every=60 --set train.lr=0.001 --set train.warmup_steps=4 --set lora.enabled=true
       --set data.aggregate=bradley_terry)
for s in 2 3; do
  [ -f "$O/rm-s$s/model/config.json" ] || /usr/bin/time -f "%U %S %e" -o "$O/rm-s$s.time" \
    chatforge rm train --model "$SFT" --data "$D" "${RMSET[@]}" --set train.seed=$s --out "$O/rm-s$s" > "$O/rm-s$s.log" 2>&1
done
/usr/bin/time -f "%U %S %e" -o "$O/rloo-ens.time" chatforge ppo --policy "$SFT" --reward "ensemble:min:$RM,$O/rm-s2,$O/rm-s3" \
  --prompts tasks:16:101 --set lora.enabled=true --set train.lr=1e-4 --set rollout.max_new_tokens=32 --set gold.spec=rule \
  --set gold.every=8 --set gold.prompts=tasks-heldout:8:977 --set gold.samples=2 --set gold.temperature=1.0 \
  --reference "$SFT" --set ppo.normalise_scores=true --set ppo.kl_coef=0.05 --set train.batch_size=16 \
  --set train.max_steps=32 --set ppo.samples_per_prompt=4 --set ppo.baseline=rloo --out "$O/rloo-ens" > "$O/rloo-ens.log" 2>&1
# judged: the best-gold checkpoint when an update beat the start (gold_best_step > 0), else the final model
step=$(python -c "import json;print(json.load(open('$O/rloo-ens/manifest.json'))['metrics'].get('gold_best_step') or 0)")
M=$O/rloo-ens/model; [ "$step" != "0" ] && M=$O/rloo-ens/best_gold
[ -f "$O/replies.json" ] || { [ -f runs/table/replies.json ] && cp runs/table/replies.json "$O/replies.json"; }
python benchmarks/rl_gold_eval.py --sft "$SFT/model" --prompts tasks-heldout:125:1 --samples 2 --temperature 1.0 \
  --rm "$RM" --cache "$O/replies.json" --out "$O/eval.json" "$M"
