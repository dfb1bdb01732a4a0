"""PyContinual's ASC and DSC (TIL) with the offline MiniLM, next to the CTR paper's BERT-base figures.

    python scripts/reproduce_pycontinual.py --data_dir ../shared/data            # full: 19 ASC + 10 DSC tasks
    python scripts/reproduce_pycontinual.py --data_dir ../shared/data --tasks asc --ntasks 5 \
        --train_data_size 200 --num_train_epochs 5 --learning_rate 1e-3 --bert_dropout 0 \
        --bert_adapter_size 128                                                # the 2-core subset in docs/results/adapters.md

Every run uses PyContinual's predefined args (--use_predefine_args) with the overrides given here;
the table states them. Writes bench_results/pycontinual-<task>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import markdown_table, run_comparison  # noqa: E402

# Ke et al., NeurIPS 2021 (CTR), Table 2, TIL, BERT-base adapters: Acc / MF1
PAPER = {
    "asc": {"ctr": "89.47 / 83.62", "hat": "86.14 / 78.52", "ewc": "56.30 / 49.58", "finetune": "54.03 / 44.81",
            "one": "85.96 / 78.07", "joint": "91.91 / 88.11"},
    "dsc": {"ctr": "89.31 / 88.75"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--tasks", nargs="+", default=["asc", "dsc"])
    ap.add_argument("--approaches", nargs="+", default=["finetune", "one", "ewc", "hat", "ctr"])
    ap.add_argument("--ntasks", type=int, default=None, help="a documented subset: the first n tasks of the order")
    ap.add_argument("--idrandom", type=int, default=0)
    ap.add_argument("--out", default="bench_results")
    args, extra = ap.parse_known_args()
    for task in args.tasks:
        flags = ["--use_predefine_args", "--data_dir", args.data_dir, "--idrandom", str(args.idrandom), *extra]
        if args.ntasks:
            flags += ["--ntasks", str(args.ntasks)]
        name = f"pycontinual-{task}"
        rows = run_comparison(task, "bert_adapter", "til", args.approaches, flags, name, Path(args.out))
        table = markdown_table(name, flags, rows, PAPER.get(task))
        (Path(args.out) / f"{name}.md").write_text(table)
        print(table)


if __name__ == "__main__":
    main()
