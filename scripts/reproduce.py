"""Run a seed paper's protocol from the reproduction registry and print our result beside the paper's.

    python scripts/reproduce.py configs/reproduce/dytox_cifar100_10.yaml --data_dir DATA   # the paper's protocol
    python scripts/reproduce.py configs/reproduce/dytox_cifar100_10.yaml --smoke           # minutes on a CPU
    python scripts/reproduce.py CONFIG --from_run RUN_DIR      # tabulate a finished run (made here or elsewhere)
    python scripts/reproduce.py CONFIG --print_command         # the `mmcl run` command line, nothing run
    python scripts/reproduce.py CONFIG --data_dir DATA -- --seed 1   # flags after `--` go to `mmcl run` last

A config (`configs/reproduce/<paper>_<benchmark>.yaml`, schema in docs/reproduce.md) holds the paper's
citation, the benchmark, its published figures (each with the metrics.json summary field that measures
the same thing and where the figure was printed), the `mmcl run` flags of the paper's protocol, the data
it needs, and a `smoke` variant that shrinks it to a few CPU minutes; where the data or the pretrained
weights are not on a CPU machine, the smoke runs a stand-in (`stand_in: true`) and its numbers are not
comparable to the paper's: the table says so on every row.

The run is `python -m mmcl.cli run ...` in a subprocess (its own exit code, its own threads); the table
(metric | paper | mmcl | note) is printed and written to <out>/<config>[-smoke].{json,md}; the run
directory is <out>/<config>[-smoke]. Exit codes: 0 done, 2 a bad config, missing data or bad flags,
otherwise the run's own failure code (1).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "configs" / "reproduce"
sys.path.insert(0, str(ROOT))

# metrics.json summary fields a published figure may be compared with (docs/metrics.md defines them)
SUMMARY_FIELDS = ("acc_final", "acc_final_weighted", "aia", "aia_weighted", "macro_f1_final", "bwt", "fwt",
                  "forgetting", "til_acc_final")
TOP_KEYS = {"paper": str, "benchmark": str, "published": dict, "run": dict, "data": dict, "smoke": dict}
FIGURE_KEYS = {"value", "metric", "source", "missing", "claimed", "definition", "note"}
DATA_KEYS = {"needs", "files", "get"}
SMOKE_KEYS = {"stand_in", "why", "uses_data", "run"}
REQUIRED_RUN = ("task", "scenario", "backbone", "baseline")
# set by the script for every run (where it goes, how it prints), not by a config
SCRIPT_FLAGS = ("output_dir", "run_name", "overwrite", "resume", "data_dir", "progress", "save_checkpoints")


class ReproduceError(ValueError):
    """A config that cannot be used, data that is missing, a run dir that is in the way (exit 2)."""


# -- the config ---------------------------------------------------------------------------------------

def _fail(path: Path, field: str, message: str) -> None:
    raise ReproduceError(f"{path} [{field}]: {message}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_config(path: str | Path) -> dict[str, Any]:
    """The config at `path`, its fields checked (ReproduceError naming the file and the field)."""
    path = Path(path)
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in REGISTRY.glob("*.yaml"))) if REGISTRY.is_dir() else "none"
        raise ReproduceError(f"{path}: no such config (the registry, {REGISTRY}: {known})")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ReproduceError(f"{path}: unreadable: {e}") from e
    if not isinstance(doc, dict):
        _fail(path, "top level", f"expected a mapping with {', '.join(TOP_KEYS)}, got {type(doc).__name__}")
    for key, kind in TOP_KEYS.items():
        if key not in doc:
            _fail(path, key, "missing")
        if not isinstance(doc[key], kind) or not doc[key]:
            _fail(path, key, f"must be a non-empty {kind.__name__}, got {doc[key]!r}")
    extra = set(doc) - set(TOP_KEYS)
    if extra:
        _fail(path, ", ".join(sorted(extra)), f"unknown field(s); a config has {', '.join(TOP_KEYS)}")
    for name, fig in doc["published"].items():
        where = f"published.{name}"
        if not isinstance(fig, dict):
            _fail(path, where, f"must be a mapping with value, metric, source; got {fig!r}")
        unknown = set(fig) - FIGURE_KEYS
        if unknown:
            _fail(path, where, f"unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(FIGURE_KEYS))}")
        if "value" not in fig:
            _fail(path, f"{where}.value", "missing (a number, or null with `missing:` saying why)")
        if fig["value"] is None:
            if not str(fig.get("missing") or "").strip():
                _fail(path, f"{where}.missing", "a null figure needs `missing:`, the reason it is not given")
        elif not _number(fig["value"]):
            _fail(path, f"{where}.value", f"must be a number or null, got {fig['value']!r}")
        if fig.get("claimed") is not None and not _number(fig["claimed"]):
            _fail(path, f"{where}.claimed", f"must be a number, got {fig['claimed']!r}")
        if fig.get("metric") not in SUMMARY_FIELDS:
            _fail(path, f"{where}.metric", f"must name a metrics.json summary field ({', '.join(SUMMARY_FIELDS)}), "
                                           f"got {fig.get('metric')!r}")
        if not str(fig.get("source") or "").strip():
            _fail(path, f"{where}.source", "missing: where the figure was printed (paper, table, erratum)")
    for key in REQUIRED_RUN:
        if key not in doc["run"]:
            _fail(path, f"run.{key}", "missing")
    for section, values in (("run", doc["run"]), ("smoke.run", (doc["smoke"].get("run") or {}))):
        taken = [k for k in values if k in SCRIPT_FLAGS]
        if taken:
            _fail(path, f"{section}.{taken[0]}", f"set by scripts/reproduce.py ({', '.join(SCRIPT_FLAGS)}), "
                                                 "not by a config")
    unknown = set(doc["data"]) - DATA_KEYS
    if unknown or not str(doc["data"].get("needs") or "").strip():
        _fail(path, "data", f"needs `needs:` (what data and weights) and optionally `files:` (any of them must "
                            f"exist under --data_dir) and `get:`; unknown: {', '.join(sorted(unknown)) or 'none'}")
    files = doc["data"].get("files") or []
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        _fail(path, "data.files", f"must be a list of paths relative to --data_dir, got {files!r}")
    smoke = doc["smoke"]
    unknown = set(smoke) - SMOKE_KEYS
    if unknown:
        _fail(path, "smoke", f"unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(SMOKE_KEYS))}")
    if not isinstance(smoke.get("run"), dict) or not smoke["run"]:
        _fail(path, "smoke.run", "must be a non-empty mapping of flags that shrink the run")
    if not isinstance(smoke.get("stand_in"), bool):
        _fail(path, "smoke.stand_in", "must be true (the smoke runs stand-in data or weights) or false")
    if not str(smoke.get("why") or "").strip():
        _fail(path, "smoke.why", "missing: what the smoke changes and why")
    doc["_path"] = path
    doc["_name"] = path.stem
    return doc


def run_values(config: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """The `mmcl run` flags of the protocol, or of its smoke (the smoke's values win; a null removes a flag)."""
    values = dict(config["run"])
    if smoke:
        for key, value in config["smoke"]["run"].items():
            if value is None:
                values.pop(key, None)
            else:
                values[key] = value
    task = str(values["task"])
    if task.endswith((".yaml", ".yml")) and not Path(task).is_absolute():
        values["task"] = str(ROOT / task)  # a task file in the repository, wherever the script runs from
    return values


def check_run(values: dict[str, Any], where: str) -> Any:
    """The RunConfig these flags make, every name and option checked as `mmcl run` would before reading data.

    Stricter than the command line: an option of a method this run does not use is an error here (a
    registry entry whose flag would be dropped with a warning does not run the protocol it claims)."""
    from mmcl.approaches import APPROACHES
    from mmcl.backbones import check_backbone_name
    from mmcl.config import RunConfig
    from mmcl.data.sequence import get_scenario
    from mmcl.flags import build_config, option_classes, option_owners, validate_options
    from mmcl.options import fields_of

    try:
        # typed as the command line types them (YAML's `5e-4` is a string; `--learning_rate 5e-4` is a float)
        typed = _parse(_argv(values))
        cfg = build_config(typed)
        own = set(fields_of(option_classes(cfg.baseline, cfg.backbone, cfg.options)))
        owners = option_owners()
        for key in values:
            if key not in RunConfig.field_names() and key not in own:
                raise ValueError(f"'{key}' is not an option of --baseline {cfg.baseline} or --backbone "
                                 f"{cfg.backbone} (it belongs to {', '.join(owners.get(key, ['nothing']))})")
        cfg.validate()
        scenario = get_scenario(cfg.scenario)
        approach = APPROACHES.get(cfg.baseline)
        check_backbone_name(cfg.backbone)
        validate_options(cfg)
        approach.check_scenario(scenario)
    except Exception as e:  # noqa: BLE001 - every kind of bad flag becomes one message naming the config
        raise ReproduceError(f"{where}: {type(e).__name__}: {' '.join(str(e).split())}") from e
    return cfg


def _parse(argv: list[str]) -> dict[str, Any]:
    """`mmcl run`'s own parse of these flags; its usage error becomes a ValueError with argparse's message."""
    from mmcl.flags import parse_run_args

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parse_run_args(argv)
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise ValueError(lines[-1] if lines else f"bad flags: {' '.join(argv)}") from None


def _argv(values: dict[str, Any]) -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        else:
            out += [f"--{key}", str(value)]
    return out


# -- data -----------------------------------------------------------------------------------------------

def data_dir_of(given: str | None) -> Path | None:
    given = given or os.environ.get("MMCL_DATA")
    return Path(given).expanduser().resolve() if given else None


def check_data(config: dict[str, Any], data_dir: Path | None) -> None:
    """A full run (or a smoke on real data) needs its data under --data_dir: say which and where, or pass."""
    data = config["data"]
    files = data.get("files") or []
    if not files:
        return
    how = f" Get it: {data['get']}" if data.get("get") else ""
    if data_dir is None:
        raise ReproduceError(f"{config['_path']}: needs {data['needs']}; pass --data_dir DIR (or set MMCL_DATA) "
                             f"with one of {', '.join(files)} in it.{how}")
    if not any((data_dir / f).exists() for f in files):
        raise ReproduceError(f"{config['_path']}: needs {data['needs']}: none of {', '.join(files)} is under "
                             f"--data_dir {data_dir}.{how}")


# -- the table --------------------------------------------------------------------------------------------

def fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.2f}"


def table_rows(config: dict[str, Any], summary: dict[str, Any], smoke: bool, extra: list[str]) -> list[dict]:
    """One row per published figure: metric, paper, mmcl, note."""
    rows = []
    for name, fig in config["published"].items():
        ours = summary.get(fig["metric"])
        notes = []
        if smoke:
            what = "stand-in data or weights, " if config["smoke"]["stand_in"] else ""
            notes.append(f"smoke run ({what}shrunk): NOT comparable to the paper")
        if fig["value"] is None:
            notes.append(f"no published figure: {' '.join(str(fig['missing']).split())}")
        elif ours is not None and not smoke:
            notes.append(f"mmcl − paper {ours - fig['value']:+.2f}")
        if fig.get("claimed") is not None:
            notes.append(f"the paper first claimed {fig['claimed']:.2f}")
        if ours is None:
            notes.append(f"metrics.json has no summary.{fig['metric']}")
        if extra and not smoke:
            notes.append(f"protocol changed by extra flags: {' '.join(extra)}")
        rows.append({"metric": f"{name} ({fig['metric']})", "key": fig["metric"], "paper": fig["value"],
                     "mmcl": ours, "note": "; ".join(notes), "source": " ".join(str(fig["source"]).split())})
    return rows


def markdown(config: dict[str, Any], rows: list[dict], smoke: bool, run_dir: str | None, command: str) -> str:
    mode = "smoke" if smoke else "the paper's protocol"
    lines = [f"**{config['_name']}** ({mode}): {config['benchmark']}", "",
             f"Paper: {config['paper']}", "", f"Run: `{command}`" + (f" → `{run_dir}`" if run_dir else ""), "",
             "| metric | paper | mmcl | note |", "|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {fmt(r['paper'])} | {fmt(r['mmcl'])} | {r['note']} |")
    lines.append("")
    lines += [f"- {r['metric']}, paper: {r['source']}" for r in rows]
    if smoke:
        lines += ["", f"SMOKE RUN: {' '.join(config['smoke']['why'].split())} It checks the pipeline and this "
                      "printout; its numbers are NOT comparable to the paper's."]
    return "\n".join(lines) + "\n"


def read_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise ReproduceError(f"{run_dir}: no metrics.json (is it an mmcl run directory, and did the run start?)")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    status = metrics.get("status", "complete")
    if status != "complete" or not metrics.get("summary"):
        why = ((metrics.get("meta") or {}).get("failure") or {}).get("message", "tasks still to train")
        raise RunFailed(f"{run_dir}: the run is {status} ({why}); finish it with `mmcl run --resume {run_dir}`")
    return metrics


class RunFailed(RuntimeError):
    """The run stopped or left no result (exit 1, or the run's own code)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def write_table(config: dict[str, Any], rows: list[dict], smoke: bool, out: Path, run_dir: str | None,
                command: str, extra: list[str]) -> str:
    name = config["_name"] + ("-smoke" if smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    doc = {"config": str(config["_path"]), "paper": config["paper"], "benchmark": config["benchmark"],
           "smoke": smoke, "stand_in": bool(smoke and config["smoke"]["stand_in"]),
           "comparable": not smoke, "command": command, "extra_flags": extra, "run_dir": run_dir, "rows": rows}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(config, rows, smoke, run_dir, command)
    (out / f"{name}.md").write_text(table)
    return table


# -- main -------------------------------------------------------------------------------------------------

def reproduce(argv: list[str]) -> int:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(prog="scripts/reproduce.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="configs/reproduce/<paper>_<benchmark>.yaml")
    ap.add_argument("--smoke", action="store_true", help="the config's shrunk variant: a few CPU minutes")
    ap.add_argument("--data_dir", default=None, help="where the data is (default: $MMCL_DATA)")
    ap.add_argument("--out", default="runs/reproduce", help="run directory and table go here")
    ap.add_argument("--from_run", default=None, help="tabulate this finished run directory; run nothing")
    ap.add_argument("--print_command", action="store_true", help="print the `mmcl run` command; run nothing")
    ap.add_argument("--overwrite", action="store_true", help="replace a run directory of the same name")
    ap.add_argument("--resume", action="store_true", help="continue the run directory of the same name")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    config = load_config(args.config)
    values = run_values(config, args.smoke)
    where = f"{config['_path']} [{'run + smoke.run' if args.smoke else 'run'}]"
    check_run(values, where)
    out = Path(args.out).expanduser().resolve()
    name = config["_name"] + ("-smoke" if args.smoke else "")
    run_dir = out / name
    data_dir = data_dir_of(args.data_dir)
    uses_data = not args.smoke or config["smoke"].get("uses_data", False)
    flags = dict(values, output_dir=str(out), run_name=name)
    if uses_data and data_dir is not None:
        flags["data_dir"] = str(data_dir)
    if args.smoke:  # minutes, not days: no checkpoints, no progress bars, a rerun replaces the last one
        flags.update(progress=False, save_checkpoints=False, overwrite=True)
    elif args.overwrite:
        flags["overwrite"] = True
    cmd = ["mmcl", "run", *(["--resume", str(run_dir)] if args.resume else _argv(flags)), *extra]
    command = " ".join(cmd)

    if args.print_command:
        print(command)
        return 0
    if args.from_run:
        summary = read_metrics(Path(args.from_run))["summary"]
        shown_dir = str(Path(args.from_run))
    else:
        if uses_data:
            check_data(config, data_dir)
        if not args.smoke and not args.resume and not args.overwrite and (run_dir / "metrics.json").exists():
            raise ReproduceError(f"{run_dir} holds a run already: tabulate it with --from_run {run_dir}, continue it "
                                 f"with --resume, or start again with --overwrite")
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        print(f"reproduce: {command}", flush=True)
        done = subprocess.run([sys.executable, "-m", "mmcl.cli", *cmd[1:]], env=env, cwd=ROOT)
        if done.returncode != 0:
            raise RunFailed(f"`{command}` exited with code {done.returncode} (its message is above)", done.returncode)
        summary = read_metrics(run_dir)["summary"]
        shown_dir = str(run_dir)
    rows = table_rows(config, summary, args.smoke, extra)
    print(write_table(config, rows, args.smoke, out, shown_dir, command, extra))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return reproduce(sys.argv[1:] if argv is None else list(argv))
    except ReproduceError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"reproduce: run failed: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
