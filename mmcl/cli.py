"""Command line: `mmcl run|list|report|push|eval`. `run.py` is `mmcl run` under PyContinual's entry point.

Every run setting and every option of the run's approach and backbone is a flag of the same name
(`--num_train_epochs`, `--idrandom`, `--lamb`, ...; `mmcl.flags`); only flags given explicitly override
the task's defaults and predefined args.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mmcl.flags import build_config, parse_run_args, resume_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcl", description="Multimodal continual learning")
    sub = parser.add_subparsers(dest="command", required=True)
    # `mmcl run` has its own parser (mmcl.flags.run_parser): its flags depend on the approach and backbone
    sub.add_parser("run", help="run a continual-learning experiment (`mmcl run --help`)", add_help=False)
    sub.add_parser("list", help="list backbones, approaches, task sequences and scenarios")
    report = sub.add_parser("report", help="re-render results.md and the plot of a run directory")
    report.add_argument("run_dir")
    push = sub.add_parser("push", help="export a finished run as a model folder and upload it to the Hugging Face Hub")
    push.add_argument("run_dir")
    push.add_argument("--repo_id", default=None, help="OWNER/NAME on the Hub")
    push.add_argument("--private", action="store_true")
    push.add_argument("--export_only", action="store_true", help="write <run_dir>/hub and upload nothing")
    ev = sub.add_parser("eval", help="test an exported model (folder or Hub repo id) on a task sequence")
    ev.add_argument("--model", required=True, help="model folder or Hub repo id")
    ev.add_argument("--task", default=None, help="task sequence (default: the one it was trained on)")
    ev.add_argument("--data_dir", default=None)
    ev.add_argument("--revision", default=None)
    return parser


def offline_by_default() -> None:
    if os.environ.get("MMCL_OFFLINE", "1") == "1":
        # The hub is often unreachable and its calls then hang; set HF_HUB_OFFLINE=0 (or MMCL_OFFLINE=0) to use it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cmd_run(values: dict) -> int:
    if not values.get("push_to_hub"):
        offline_by_default()
    from mmcl.engine import Engine
    from mmcl.reporting import modality_groups

    changes: dict = {}
    if values.get("resume"):
        cfg, changes = resume_config(values["resume"], values)
    else:
        cfg = build_config(values)
    engine = Engine(cfg)
    engine.resume_changes = changes
    matrix = engine.run()
    if engine.is_main:
        s = matrix.summary()
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"\nrun dir: {engine.run_dir}")
        print(f"ACC {fmt(s['acc_final'])}  macro-F1 {fmt(s['macro_f1_final'])}  BWT {fmt(s['bwt'])}  "
              f"FWT {fmt(s['fwt'])}  forgetting {fmt(s['forgetting'])}  AIA {fmt(s['aia'])}")
        groups = modality_groups([t.modality for t in engine.seq])
        if groups:  # a mixed run: each modality's share, and what the other one cost it
            for name, g in matrix.group_summary(groups).items():
                while_ = "  ".join(f"BWT while {h} trained {fmt(v)}" for h, v in g["bwt_while"].items())
                print(f"{name}: ACC {fmt(g['acc_final'])}  BWT {fmt(g['bwt'])}  ({while_})")
        if cfg.push_to_hub:
            from mmcl.hub import push_to_hub

            print(f"pushed to {push_to_hub(engine.run_dir, cfg.hub_model_id, private=cfg.hub_private)}")
    _shutdown(engine.accelerator)
    return 0


def _shutdown(accelerator) -> None:
    # Multi-node runs need every rank to leave together, or the second agent dies at teardown.
    import torch.distributed as dist

    accelerator.wait_for_everyone()
    accelerator.free_memory()  # DDP wrappers go while the process group still exists
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_list() -> int:
    from mmcl.approaches import APPROACHES
    from mmcl.backbones import BACKBONES
    from mmcl.data import SCENARIOS, TASK_SEQUENCES, task_spec

    print("backbones:   ", ", ".join(BACKBONES.names()), "(or any Hugging Face model id / local path)")
    print("approaches:  ", ", ".join(APPROACHES.names()))
    print("scenarios:   ", ", ".join(SCENARIOS.names(with_aliases=True)))
    print("task sequences:")
    for name in TASK_SEQUENCES.names():
        print(f"  {name:<16} {task_spec(name).get('description', '')}")
    return 0


def cmd_report(run_dir: str) -> int:
    from mmcl.reporting import load_metrics, write_report

    matrix, meta = load_metrics(Path(run_dir))
    write_report(Path(run_dir), matrix, meta)
    print(f"re-rendered {run_dir}/results.md and accuracy_matrix.png")
    return 0


def cmd_push(values: dict) -> int:
    from mmcl.hub import export_run, push_to_hub

    if values["export_only"]:
        print(f"wrote {export_run(values['run_dir'])}")
    elif not values["repo_id"]:
        raise ValueError("mmcl push needs --repo_id OWNER/NAME (or --export_only)")
    else:
        print(f"pushed to {push_to_hub(values['run_dir'], values['repo_id'], private=values['private'])}")
    return 0


def cmd_eval(values: dict) -> int:
    offline_by_default()
    from mmcl.hub import evaluate_pretrained

    acc, f1 = evaluate_pretrained(values["model"], values["task"], values["data_dir"], values["revision"])
    print("accuracy:", " ".join(f"{a:.2f}" for a in acc), f"(mean {sum(acc) / len(acc):.2f})")
    print("macro-F1:", " ".join(f"{a:.2f}" for a in f1))
    return 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())  # library messages (transformers', the hub's) span lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from mmcl.engine_errors import MmclError
    from mmcl.registry import UnknownNameError

    try:
        if argv[:1] == ["run"]:
            return cmd_run(parse_run_args(argv[1:]))
        args = build_parser().parse_args(argv)
        values = {k: v for k, v in vars(args).items() if k != "command"}
        if args.command == "list":
            return cmd_list()
        if args.command == "report":
            return cmd_report(values["run_dir"])
        if args.command == "push":
            return cmd_push(values)
        if args.command == "eval":
            return cmd_eval(values)
    except MmclError as e:
        # a run that could not go on (exit 1) or input it cannot use (exit 2): one clear line, no traceback
        print(f"mmcl: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, UnknownNameError) as e:
        # bad input: one clear line naming the flag, file or field, no traceback
        print(f"mmcl: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
