#!/usr/bin/env bash
# Isolated venv for the TRL 1.12 PPO peer of `chatforge bench ppo`: chatforge pins trl 1.16, which no
# longer ships `trl.experimental.ppo.PPOTrainer`, so the peer cannot share chatforge's venv.
# Verified result (2 CPU cores, no GPU): torch 2.13.0+cpu, transformers 5.24.0, trl 1.12.0, ~75 s.
# torch is pinned first so that trl's resolver cannot swap it; transformers is whatever trl 1.12 asks for.
#   bash benchmarks/trl112/setup.sh            # creates benchmarks/trl112/.venv (gitignored)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
"$python" -m venv "$here/.venv"
pip="$here/.venv/bin/pip"
"$pip" install --quiet --upgrade pip
"$pip" install --quiet "torch==2.13.0"
"$pip" install --quiet "trl==1.12.0" "torch==2.13.0"
"$here/.venv/bin/python" - <<'PY'
import torch, transformers, trl
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"ok: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
