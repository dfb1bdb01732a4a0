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
    # numbers below ~1e-38 (softmax tails, Adam's second moments) take a slow path on x86 CPUs; flushing them
    # to zero changes nothing a float32 result can show and made a training step 6 % faster (benchmarks.md)
    torch.set_flush_denormal(True)


def release_prepared(accelerator) -> None:
    """Drop the accelerator's references to a finished task's prepared model wrapper, optimiser, scheduler and
    loaders, so one per task does not pile up.

    Accelerate's `free_memory` does this and then a full `gc.collect()`, which takes 0.3-1 s in a process
    holding many objects (a long stream of short tasks, a test session: about 40 % of the test suite's time).
    Only DDP needs that collection: its reducers must be freed while the process group still exists (freed
    at exit, after it, they abort under gloo). One process has no reducer, and reference counting (or the
    interpreter's own collections) frees the rest."""
    if accelerator.num_processes > 1:
        accelerator.free_memory()
        return
    for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
        getattr(accelerator, name).clear()  # what free_memory resets (accelerate >= 1.0), without the collection
    accelerator.step = 0
