"""From the command line (or a dict of values) to a RunConfig: the layers, the options of the methods a
run uses, strict --resume, and the grouped `mmcl run` parser.

Precedence, lowest first: defaults (RunConfig's and each method's Options: the paper's) < the task
sequence's `defaults:` < `tasks/predefined/<task>.yaml` (with --use_predefine_args) < the preset
(`--preset NAME`: configs/presets/NAME.yaml, our tuning) < flags given on the command line.
A task YAML may set options of any method (`levit_gamma` per sequence); those of methods the run does
not use are dropped. On the command line only the run's own methods' options exist as flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from mmcl.config import RunConfig
from mmcl.options import Options, field_help, fields_of, flag_type, group_title

# --resume keeps what the run trains. Flags that only change how it runs may be given freely; the
# optimisation flags may change only when the run stopped on a non-finite loss (recorded in its history);
# every other flag that differs from the run's config.yaml is an error.
RUNTIME_FIELDS = ("progress", "save_checkpoints", "eval_batch_size", "data_dir", "cpu", "push_to_hub",
                  "hub_model_id", "hub_private", "resume", "overwrite", "report_to")
RECOVERY_FIELDS = ("learning_rate", "head_lr", "lr_reference_batch", "optimizer", "momentum", "weight_decay",
                   "lr_scheduler", "warmup_proportion", "clipgrad", "mixed_precision")


# -- which options exist ----------------------------------------------------------------------------

def approach_option_classes(baseline: str) -> list[type[Options]]:
    from mmcl.approaches import APPROACHES

    cls = getattr(APPROACHES.get(baseline), "Options", None)
    return [cls] if cls is not None else []


def option_classes(baseline: str, backbone: str, options: dict[str, Any]) -> list[type[Options]]:
    """The Options classes a run with this approach and backbone uses (a `dual` backbone's towers too)."""
    from mmcl.backbones import backbone_option_classes

    return approach_option_classes(baseline) + backbone_option_classes(backbone, options)


def option_owners() -> dict[str, list[str]]:
    """Every option of every registered approach and backbone: flag name -> who uses it."""
    from mmcl.approaches import APPROACHES
    from mmcl.backbones import BACKBONES

    owners: dict[str, list[str]] = {}
    for kind, registry, flag in (("approach", APPROACHES, "baseline"), ("backbone", BACKBONES, "backbone")):
        for name in registry.names():
            cls = getattr(registry.get(name), "Options", None)
            for f in dataclasses.fields(cls) if cls is not None else ():
                owners.setdefault(f.name, []).append(f"--{flag} {name}")
    return owners


def check_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Every key a run setting or an option of some method; else an error with the closest names."""
    valid = RunConfig.field_names() | set(option_owners())
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{source}: unknown setting '{key}'.{hint}")
    return values


def resolve_options(cfg: RunConfig, source: str = "config") -> RunConfig:
    """`cfg.options` becomes every option of the run's methods (given or default), in their order; options
    of other methods are dropped; a name no method knows is an error."""
    check_keys(cfg.options, source)
    classes = option_classes(cfg.baseline, cfg.backbone, cfg.options)
    cfg.options = {name: cfg.options.get(name, f.default) for name, (_, f) in fields_of(classes).items()}
    return cfg


def validate_options(cfg: RunConfig) -> None:
    """Each method checks its own options (ValueError naming the flag)."""
    for cls in option_classes(cfg.baseline, cfg.backbone, cfg.options):
        cls.from_values(cfg.options).validate()


# -- the layers -----------------------------------------------------------------------------------

def predefined_args(task: str, backbone: str, baseline: str, tasks_dir: Path) -> dict[str, Any]:
    """Tuned values from `tasks/predefined/<task>.yaml`.

    The file holds `default:` plus optional sections keyed `backbone`, `baseline` or
    `backbone/baseline`, applied in that order (more specific wins).
    """
    path = tasks_dir / "predefined" / f"{task}.yaml"
    if not path.is_file():
        return {}
    with open(path) as f:
        table = yaml.safe_load(f) or {}
    merged: dict[str, Any] = {}
    for key in ("default", backbone, baseline, f"{backbone}/{baseline}"):
        merged.update(check_keys(table.get(key) or {}, f"{path} [{key}]"))
    return merged


PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
# what a preset may not set: it tunes an approach, it does not choose what runs or where it goes
_NOT_IN_PRESET = ("task", "baseline", "backbone", "scenario", "preset", "eval_split", "resume", "output_dir",
                  "run_name", "overwrite")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []


def load_preset(name: str, baseline: str) -> dict[str, Any]:
    """The settings of preset `name` (configs/presets/NAME.yaml or a YAML path) for a run of `baseline`.

    A preset is our tuning of one approach, kept apart from its paper defaults: YAML with `approach:`
    (the approach, or a list, it is for), `settings:` (flag: value) and a comment on what it changes and
    what it measured on validation data."""
    from mmcl.approaches import APPROACHES

    path = Path(name) if name.endswith((".yaml", ".yml")) else PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"--preset {name}: no preset {path}.{hint} Presets: {', '.join(preset_names()) or 'none'}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"--preset {name}: {path} is unreadable: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict) or "approach" not in doc:
        raise ValueError(f"--preset {name}: {path} must be a mapping with 'approach:' and a 'settings:' mapping")
    wanted = doc["approach"] if isinstance(doc["approach"], list) else [doc["approach"]]
    run_approach = APPROACHES.get(baseline).name
    if run_approach not in {APPROACHES.get(a).name for a in wanted}:
        raise ValueError(f"--preset {name} is a setting of --baseline {', '.join(map(str, wanted))}, "
                         f"not of --baseline {baseline} ({path})")
    settings = check_keys(doc["settings"], f"{path} [settings]")
    for key in settings:
        if key in _NOT_IN_PRESET:
            raise ValueError(f"{path} [settings]: a preset may not set '{key}' (it tunes an approach; the run "
                             f"chooses {', '.join(_NOT_IN_PRESET)})")
    return settings


def build_config(cli_values: dict[str, Any], resolve: bool = True) -> RunConfig:
    """Merge the layers; `cli_values` holds only the settings given explicitly."""
    from mmcl.data import TASKS_DIR, task_spec

    check_keys(cli_values, "command line")
    base = RunConfig()
    spec = task_spec(cli_values.get("task", base.task))
    values: dict[str, Any] = dict(check_keys(spec.get("defaults") or {}, f"{spec['_path']} [defaults]"))
    if cli_values.get("use_predefine_args"):
        backbone = cli_values.get("backbone", values.get("backbone", base.backbone))
        baseline = cli_values.get("baseline", values.get("baseline", base.baseline))
        values.update(predefined_args(spec["name"], backbone, baseline, TASKS_DIR))
    preset = cli_values.get("preset", values.get("preset"))
    if preset:
        values.update(load_preset(preset, cli_values.get("baseline", values.get("baseline", base.baseline))))
    values.update(cli_values)
    cfg = RunConfig.from_dict(values, source="command line")
    if cfg.data_seed is None:
        cfg.data_seed = cfg.seed
    return resolve_options(cfg) if resolve else cfg


def resume_config(run_dir: str | Path, given: dict[str, Any]) -> tuple[RunConfig, dict[str, list]]:
    """The config of the run in `run_dir` with the flags `given` on the command line applied, and the
    optimisation flags changed after a divergence ({flag: [was, now]}); a flag that would change what a
    healthy run trains is a ResumeConflictError listing each one."""
    from mmcl.engine_errors import ResumeConflictError

    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {path.name} there; is it an mmcl run directory?")
    try:
        cfg = resolve_options(RunConfig.load(path), str(path))
    except (yaml.YAMLError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"--resume {run_dir}: {path} is unreadable: {e}") from e
    check_keys(given, "command line")
    try:
        with open(run_dir / "metrics.json", encoding="utf-8") as f:
            failure = (json.load(f).get("meta") or {}).get("failure") or {}
    except (OSError, ValueError, AttributeError):
        failure = {}
    diverged = failure.get("kind") == "non-finite"
    changed, conflicts = {}, []
    for key, value in given.items():
        was = getattr(cfg, key, None)
        if key in RUNTIME_FIELDS or value == was:
            cfg.set(key, value)
        elif key in RECOVERY_FIELDS and diverged:
            changed[key] = [was, value]
            cfg.set(key, value)
        else:
            conflicts.append(f"--{key} {value} (the run has {was})")
    if conflicts:
        why = ("they change what the run trains" if not any(k.split()[0][2:] in RECOVERY_FIELDS for k in conflicts)
               else "they change what the run trains (optimisation flags may change only after the run stopped "
                    "on a non-finite loss)")
        raise ResumeConflictError(
            f"--resume {run_dir}: {len(conflicts)} flag(s) differ from {path} and {why}: " + "; ".join(conflicts)
            + ". Drop them to continue the run as it was, or start a new run. Flags --resume may change: "
            + ", ".join(f"--{k}" for k in RUNTIME_FIELDS if k != "resume"))
    cfg.resume = str(run_dir)
    return cfg.validate(), changed


# -- the command line -------------------------------------------------------------------------------

def _add_flag(group, name: str, kind: type, default: Any, help_: str) -> None:
    if not help_:
        text = f"default: {default}"
    else:  # a help line that explains its default itself keeps it
        text = help_ if "default" in help_ else f"{help_} (default: {default})"
    text = text.replace("%", "%%")  # argparse formats help with %
    if kind is bool:
        group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
    else:
        group.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help=text)


def all_option_classes() -> list[type[Options]]:
    from mmcl.approaches import APPROACHES
    from mmcl.backbones import BACKBONES

    found: list[type[Options]] = []
    for registry in (APPROACHES, BACKBONES):
        for name in registry.names():
            cls = getattr(registry.get(name), "Options", None)
            if cls is not None and cls not in found:
                found.append(cls)
    return found


def add_run_flags(parser: argparse.ArgumentParser, classes: Iterable[type[Options]] | None = None) -> None:
    """Run settings in their groups, then one group per Options class declaring fields (all classes if None)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(RunConfig):
        group = f.metadata.get("group")
        if group is None:
            continue
        if group not in groups:
            groups[group] = parser.add_argument_group(f"run: {group}")
        _add_flag(groups[group], f.name, flag_type(RunConfig, f), f.default, field_help(f))
    classes = all_option_classes() if classes is None else list(classes)
    owners = option_owners()
    by_class: dict[type, list] = {}
    for name, (declaring, f) in fields_of(classes).items():
        by_class.setdefault(declaring, []).append(f)
    for declaring, fs in by_class.items():
        users = sorted({u.split()[-1] for f in fs for u in owners.get(f.name, [])})
        group = parser.add_argument_group(f"{group_title(declaring)} ({', '.join(users)})" if users else group_title(declaring))
        for f in fs:
            _add_flag(group, f.name, flag_type(declaring, f), f.default, field_help(f))


_SELECTORS = ("task", "baseline", "backbone", "text_backbone", "vision_backbone", "resume", "use_predefine_args")


def run_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The `mmcl run` parser for this command line: the run's own methods' options only, or, for a plain
    `--help` without --baseline/--backbone, every method's."""
    pre = argparse.ArgumentParser(add_help=False)
    for name in _SELECTORS:
        if name == "use_predefine_args":
            pre.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            pre.add_argument(f"--{name}", default=argparse.SUPPRESS)
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    chosen = {k: v for k, v in vars(known).items() if k != "help"}
    parser = argparse.ArgumentParser(
        prog="mmcl run", description="Run a continual-learning experiment. `mmcl run --baseline NAME --help` "
        "shows the run settings and that approach's options.")
    if known.help and not ({"baseline", "backbone", "resume"} & set(chosen)):
        add_run_flags(parser, None)
    else:
        add_run_flags(parser, effective_option_classes(chosen))
    return parser


def effective_option_classes(chosen: dict[str, Any]) -> list[type[Options]]:
    """The Options classes of the run these selector flags describe (layers applied, or the resumed run's)."""
    if chosen.get("resume"):
        path = Path(chosen["resume"]) / "config.yaml"
        if path.is_file():
            try:
                cfg = RunConfig.load(path)
                return option_classes(cfg.baseline, cfg.backbone, cfg.options)
            except Exception:  # noqa: BLE001 - resume_config reports an unreadable config.yaml properly
                pass
        return []
    cfg = build_config(chosen, resolve=False)
    return option_classes(cfg.baseline, cfg.backbone, cfg.options)


def parse_run_args(argv: list[str]) -> dict[str, Any]:
    """The flags given on an `mmcl run` command line, by name.

    An option of a method the run does not use (`--memory_size` for finetune: one flag list shared by
    several approaches, as in PyContinual's scripts and `scripts/compare.py`) is dropped with a warning
    naming who uses it, since it could not change this run; any other unknown flag is an error."""
    import sys

    parser = run_parser(argv)
    args, rest = parser.parse_known_args(argv)
    if rest:
        owners = option_owners()
        foreign, after_foreign = {}, False
        for token in rest:
            if not token.startswith("--"):
                if not after_foreign:
                    parser.error(f"unrecognized arguments: {' '.join(rest)}")
                after_foreign = False  # the value of the foreign flag before it
                continue
            name = token.split("=", 1)[0].removeprefix("--")
            name = name if name in owners else name.removeprefix("no-")
            if name not in owners:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            foreign[token.split("=", 1)[0]] = owners[name]
            after_foreign = "=" not in token
        for flag, used_by in foreign.items():
            print(f"mmcl: warning: ignoring {flag}: an option of {', '.join(used_by)}, not of this run's approach "
                  f"and backbone (see `mmcl run --baseline NAME --help`)", file=sys.stderr)
    return vars(args)
