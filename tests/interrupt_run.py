"""`mmcl run` that kills itself (SIGKILL, no clean-up) at a chosen point, for tests/test_trust.py.

    interrupt_run.py POINT N -- <mmcl run flags>

POINT, counted from 1 over the whole process:
  after_checkpoint  once the N-th checkpoint directory is complete (between two tasks)
  evaluate          on entering the N-th test-set evaluation of one task (mid-row: earlier tasks of
                    the row are evaluated, later ones not)
  checkpoint        during the N-th checkpoint write: model.safetensors is written, state.json not
No sleeps and no timing: the kill happens at that point in every run.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kill() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counted(fn, n: int, before: bool):
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == n:
            kill()
        out = fn(*args, **kwargs)
        if not before and calls[0] == n:
            kill()
        return out

    return wrapper


def main() -> int:
    point, n = sys.argv[1], int(sys.argv[2])
    flags = sys.argv[sys.argv.index("--") + 1:]
    import safetensors.torch

    from mmcl import engine, rundir
    from mmcl.cli import main as mmcl_main

    if point == "after_checkpoint":
        rundir.RunDir.save_checkpoint = counted(rundir.RunDir.save_checkpoint, n, before=False)
    elif point == "evaluate":
        original = engine.Engine.evaluate_task

        def test_split_only(self, task, split="test", _wrapped=counted(lambda *a: None, n, before=True)):
            if split == "test":
                _wrapped()
            return original(self, task, split)

        engine.Engine.evaluate_task = test_split_only
    elif point == "checkpoint":
        safetensors.torch.save_model = counted(safetensors.torch.save_model, n, before=False)
    else:
        raise SystemExit(f"unknown point {point}")
    return mmcl_main(["run", *flags])


if __name__ == "__main__":
    sys.exit(main())
