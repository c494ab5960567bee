#!/usr/bin/env bash
# The equal-budget table of issue 18: every RL method from the same LoRA SFT model, the same reward model and
# the same 128 training prompts, 512 episodes (rollouts scored by the RM) each, then all judged on the same
# ~1,000 held-out prompts by benchmarks/rl_gold_eval.py (gold = `rule`, the panel's utility without noise;
# greedy and 2 sampled replies at T 1 with paired seeds; the RM's own held-out score change).
#
#   bash benchmarks/rl_table.sh [SFT_RUN] [RM_RUN] [OUT]      # defaults: the --base demo's runs, runs/table
#
# Each run dir is skipped when it already completed; CPU seconds (user + sys) land in OUT/<method>.time.
# The PPO-family runs and GRPO measure the gold on the validation prompts every 8 iterations and keep the best
# checkpoint (`best_gold/`), as the demo does; that checkpoint is what the eval judges when the gold rose above
# its start, else the run's final model.
set -euo pipefail
SFT=${1:-runs/demo-smol/sft}
RM=${2:-runs/demo-smol/loop/round-1/rm}
OUT=${3:-runs/table}
PROMPTS=tasks:16:101
mkdir -p "$OUT"
COMMON=(--policy "$SFT" --reward "$RM" --prompts "$PROMPTS" --set lora.enabled=true --set train.lr=1e-4
        --set rollout.max_new_tokens=32 --set gold.spec=rule --set gold.every=8 --set gold.prompts=tasks-heldout:8:977
        --set gold.samples=2 --set gold.temperature=1.0)
PPO=(--reference "$SFT" --set ppo.normalise_scores=true --set ppo.kl_coef=0.05 --set train.batch_size=16
     --set train.max_steps=32)

timed() {  # timed NAME CMD...: run unless OUT/NAME completed, CPU seconds to OUT/NAME.time
  local name=$1; shift
  if grep -q '"status": "completed"' "$OUT/$name/manifest.json" 2>/dev/null; then echo "$name: done"; return; fi
  echo "== $name: $*"
  /usr/bin/time -f "%U %S %e" -o "$OUT/$name.time" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
}

timed ppo-critic chatforge ppo "${COMMON[@]}" "${PPO[@]}" --set ppo.samples_per_prompt=1 --set ppo.baseline=critic
timed ppo-both chatforge ppo "${COMMON[@]}" "${PPO[@]}" --set ppo.samples_per_prompt=4 --set ppo.baseline=both
timed rloo chatforge ppo "${COMMON[@]}" "${PPO[@]}" --set ppo.samples_per_prompt=4 --set ppo.baseline=rloo
# GRPO: train.batch_size counts prompts, x group_size 4 = 16 episodes per iteration; KL in the loss at the same 0.05
timed grpo chatforge grpo "${COMMON[@]}" --reference "$SFT" --set grpo.group_size=4 --set grpo.beta=0.05 \
  --set train.batch_size=4 --set train.max_steps=32
# best-of-4 distillation: 128 prompts x 4 samples = 512 scored samples, SFT on the 128 picks
timed bon chatforge bon --policy "$SFT" --reward "$RM" --prompts "$PROMPTS" --set bon.n=4 \
  --set bon.prompts_per_round=128 --set lora.enabled=true --set train.max_steps=16
# DPO on the round's own comparisons (the RM's training data): 64 steps x 8 = 512 consensus pairs
timed dpo chatforge dpo --policy "$SFT" --data "$(dirname "$RM")/comparisons.jsonl" --set data.aggregate=bradley_terry \
  --set lora.enabled=true --set train.lr=5e-5 --set train.max_steps=64 --set train.batch_size=8

# the checkpoint judged: best_gold/ when the validation gold rose above its start, else the final model (a kept
# start is the SFT model itself, whose replies would all tie)
judged() {
  python - "$1" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
step = json.loads((run / "manifest.json").read_text())["metrics"].get("gold_best_step")
print(run / ("best_gold" if step else "model"))
PY
}
python benchmarks/rl_gold_eval.py --sft "$SFT/model" --prompts tasks-heldout:125:1 --samples 2 --temperature 1.0 \
  --rm "$RM" --cache "$OUT/replies.json" --out "$OUT/eval.json" \
  "$(judged "$OUT/ppo-critic")" "$(judged "$OUT/ppo-both")" "$(judged "$OUT/rloo")" "$(judged "$OUT/grpo")" \
  "$OUT/bon/model" "$OUT/dpo/model"
