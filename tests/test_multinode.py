"""The multi-node recipe, simulated on one machine: examples/slurm/chatforge.sbatch run with stand-ins for
`srun` (one task per "node", here two local processes) and `scontrol`, so two torchrun launchers meet at a
c10d rendezvous as two nodes of one process each. The run must train as one 2-rank job: the same per-step
losses as one process on the same global batch, one checkpoint written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port, make_data_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "chatforge.sbatch"
SETS = ["model.depth=2", "model.aspect=64", "model.head_dim=32", "train.seq_len=32", "train.warmup_steps=2",
        "train.log_every=1", "log.tensorboard=false", "train.checkpoint_every=4", "train.eval_every=0",
        "train.threads=1", "train.max_steps=4"]

SRUN = """#!/bin/bash
# stand-in for srun: one task per node (SLURM_NNODES local processes), fail if any fails
[ "$1" = "--kill-on-bad-exit=1" ] && shift
pids=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node "$@" > "$NODE_LOGS/node-$node.log" 2>&1 & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
"""


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def sets(items: list[str]) -> list[str]:
    return sum([["--set", s] for s in items], [])


def test_slurm_script_trains_as_two_nodes(tiny_tokenizer, tmp_path):
    data = make_data_dir(tmp_path / "data", tiny_tokenizer)
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "srun").write_text(SRUN)
    (shims / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # `scontrol show hostnames`: the node list
    for f in shims.iterdir():
        f.chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()),
           "CHATFORGE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "NODE_LOGS": str(logs), "CI": "1"}
    out = tmp_path / "two-nodes"
    r = subprocess.run(["bash", str(SCRIPT), "pretrain", "--out", str(out),
                        *sets([*SETS, f"data.dir={data}", "train.batch_size=2"])],
                       env=env, capture_output=True, text=True, timeout=600)
    node_logs = "\n".join(p.read_text()[-2000:] for p in sorted(logs.iterdir()))
    assert r.returncode == 0, r.stderr[-2000:] + node_logs
    assert "2 nodes x 1 processes, rendezvous 127.0.0.1:" in r.stdout
    assert len(list(logs.iterdir())) == 2  # two launchers, one per "node"
    state = json.loads((out / "manifest.json").read_text())
    assert state["status"] == "completed"
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "chatforge.cli", "pretrain", "--out", str(one),
                    *sets([*SETS, f"data.dir={data}", "train.batch_size=4"])], env={**env, "PATH": os.environ["PATH"]},
                   check=True, capture_output=True, timeout=600)
    a, b = losses(one), losses(out)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
