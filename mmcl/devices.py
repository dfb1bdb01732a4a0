"""The run's devices and processes: one Accelerator, and the CPU threads shared among this machine's processes."""
from __future__ import annotations

import os

import torch


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # per-task heads leave other tasks' parameters unused in a step
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp])
    if accelerator.device.type == "cpu":
        set_cpu_threads(accelerator)
    return accelerator


def set_cpu_threads(accelerator) -> None:
    """Share the cores among this machine's processes.

    `accelerate launch` sets OMP_NUM_THREADS=1 even for a single process, which halves
    CPU speed on two cores; MMCL_NUM_THREADS overrides.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = int(os.environ.get("MMCL_NUM_THREADS", 0)) or max(1, (os.cpu_count() or 1) // max(1, local))
    torch.set_num_threads(threads)
