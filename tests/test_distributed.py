"""Several processes and machines (gloo on the CPU) give the one-process results with the same global batch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

SCRIPT = str(Path(__file__).with_name("distributed_runs.py"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
APPROACHES = "finetune,ewc,replay,lwf,joint,one,dytox"
TOLERANCE = 1.0  # accuracy points per matrix entry: only the order of floating-point reductions differs
# DyTox trains 4 epochs then fine-tunes 20 more at lr 5e-3: the reduction-order noise can grow into one
# flipped prediction of the 72 test examples (1.39 points). One example per entry, no more; that its
# fine-tuning uses the global batch is tested directly in test_dytox.py.
TOLERANCES = {"dytox": 100 / 72 + 1e-6}


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", MMCL_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false")


def launch_args(num_processes, num_machines=1, rank=0, port=None):
    args = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines",
            str(num_machines), "--dynamo_backend", "no", "--mixed_precision", "no"]
    if num_machines > 1:
        args += ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    return args


def matrices(out: Path, approaches: str) -> dict:
    return {a: json.loads((out / f"{a}.json").read_text()) for a in approaches.split(",")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = subprocess.run([sys.executable, SCRIPT, str(out), "16", APPROACHES], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return matrices(out, APPROACHES)


def assert_same(reference: dict, other: dict, processes: int, learned: float = 80) -> None:
    for name, ref in reference.items():
        assert other[name]["processes"] == processes
        assert ref["processes"] == 1
        np.testing.assert_allclose(other[name]["acc"], ref["acc"], atol=TOLERANCES.get(name, TOLERANCE), err_msg=name)
        assert other[name]["evaluated"] == other[name]["test_sizes"] == ref["test_sizes"]  # no padding duplicates
        assert np.diag(ref["acc"]).min() > learned, (name, ref["acc"])  # the runs learn: the comparison means something


def test_two_processes_equal_one_process_with_the_same_global_batch(one_process, tmp_path):
    done = subprocess.run(launch_args(2) + [SCRIPT, str(tmp_path), "8", APPROACHES], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(one_process, matrices(tmp_path, APPROACHES), processes=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_on_loopback_complete_a_run(one_process, tmp_path):
    port = free_port()
    procs = [subprocess.Popen(launch_args(2, 2, rank, port) + [SCRIPT, str(tmp_path), "8", "finetune,replay"],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"machine {rank}: {err[-3000:]}"
    found = matrices(tmp_path, "finetune,replay")
    assert_same({k: one_process[k] for k in found}, found, processes=2)


@pytest.mark.slow
def test_two_processes_equal_one_process_for_hat_and_ctr(tmp_path):
    """HAT's gradient blocking and compensation and CTR's routing run after DDP's all-reduce (minutes)."""
    runs = {}
    for procs, batch in ((1, "16"), (2, "8")):
        out = tmp_path / str(procs)
        cmd = ([sys.executable] if procs == 1 else launch_args(2)) + [SCRIPT, str(out), batch, "hat,ctr"]
        done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[procs] = matrices(out, "hat,ctr")
    assert_same(runs[1], runs[2], processes=2, learned=60)
