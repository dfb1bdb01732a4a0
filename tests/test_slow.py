"""End-to-end runs through the real entry points (minutes): `pytest -m slow`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def launch(args, tmp_path, extra_env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    cmd = [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "run.py", *args, "--output_dir", str(tmp_path), "--no-progress"]
    # the timeout only guards against a hang: the main job takes about 5 minutes alone on 2 cores and timed
    # out at 15 with two other jobs sharing them
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)


@pytest.mark.distributed
def test_accelerate_launch_run_py_split_digits(tmp_path):
    out = launch(["--task", "split_digits", "--backbone", "vit", "--baseline", "replay", "--scenario", "cil",
                  "--run_name", "digits"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "digits" / "metrics.json").read_text())
    assert metrics["summary"]["tasks_done"] == 5
    assert metrics["summary"]["til_acc_final"] > metrics["summary"]["acc_final"]


def test_main_job_bert_adapter_ctr_on_the_default_task(tmp_path):
    """The README's main job, as it runs after set-up: CTR on vader4, the default task sequence."""
    out = launch(["--backbone", "bert_adapter", "--baseline", "ctr", "--run_name", "main"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "main" / "metrics.json").read_text())
    assert len(metrics["matrix"]["acc"]) == 4 and all(len(r) == 4 for r in metrics["matrix"]["acc"])
    assert metrics["meta"]["task_sequence"] == "vader4" and metrics["meta"]["approach"] == "ctr"
    assert metrics["summary"]["acc_final"] > 70
