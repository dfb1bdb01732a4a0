"""Share a finished run: export it as a model folder, push that to the Hugging Face Hub, load it back.

A model folder holds exactly `EXPORT_FILES`:
    model.safetensors   the approach after the last task (backbone, heads, masks, buffers; no pickle)
    config.json         the run's settings, the task layout (names, modalities, classes), approach state
    metrics.json        the run's accuracy matrices and summary
    accuracy_matrix.png the heatmap
    README.md           a model card (YAML metadata for the Hub, then the run's results page)

`from_pretrained(repo_id_or_path)` rebuilds the approach from config.json alone (no data needed) and
loads the weights; `evaluate_pretrained` re-tests it on a task sequence's test sets.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mmcl.config import RunConfig
from mmcl.engine_errors import CheckpointError, HubError

EXPORT_FILES = ("model.safetensors", "config.json", "metrics.json", "accuracy_matrix.png", "README.md")
CONFIG_FILE = "config.json"


def final_checkpoint(run_dir: Path, num_tasks: int) -> Path:
    path = run_dir / "checkpoints" / f"task_{num_tasks - 1}"
    if not (path / "state.json").is_file():
        done = sorted(p.name for p in (run_dir / "checkpoints").glob("task_*")) if (run_dir / "checkpoints").is_dir() else []
        raise CheckpointError(f"run '{run_dir}' has no checkpoint of its last task ({path} missing; found {done or 'none'}): "
                              f"finish it with `mmcl run --resume {run_dir}` (and keep --save_checkpoints on)")
    return path


# the summary scalars a card's model-index lists besides results.md's (reporting.SUMMARY_ROWS); undefined ones
# are left out
WEIGHTED_METRICS = {"acc_final_weighted": "Final accuracy over all test examples (%)",
                    "aia_weighted": "AIA over all test examples (%)"}


def model_card(config: dict[str, Any], results_md: str, summary: dict[str, Any] | None = None) -> str:
    """The card: huggingface_hub's metadata (tags, and a model-index with each summary metric of the run on its
    task sequence and scenario, which the Hub shows as evaluation results), the results page, how to use it."""
    from huggingface_hub import EvalResult, ModelCardData

    from mmcl.reporting import SUMMARY_ROWS

    run = config["run"]
    tags = ["continual-learning", config["approach"], config["backbone"].replace("/", "-"), config["scenario"]]
    name = f"{config['task_sequence']}-{config['backbone'].replace('/', '-')}-{config['approach']}-{config['scenario']}"
    results = [EvalResult(task_type="continual-learning", task_name=f"continual learning ({config['scenario']})",
                          dataset_type=config["task_sequence"], dataset_name=config["task_sequence"],
                          dataset_config=config["scenario"], dataset_split=run.get("eval_split", "test"),
                          metric_type=key, metric_name=label, metric_value=round(float(summary[key]), 4))
               for key, label in [*SUMMARY_ROWS, *WEIGHTED_METRICS.items()]
               if summary and summary.get(key) is not None]
    data = ModelCardData(library_name="mmcl", tags=list(dict.fromkeys(tags)), datasets=[config["task_sequence"]],
                         metrics=["accuracy"], model_name=name, eval_results=results or None)
    usage = ["## How to use", "", "```python", "from mmcl.hub import from_pretrained", "",
             "model = from_pretrained(\"<this repo id or folder>\")  # an mmcl Approach, in eval mode",
             "logits = model.predict(batch, task_id)  # task_id: None unless the scenario gives it",
             "```", "", "Re-test it on the task sequence's test sets:", "",
             f"    mmcl eval --model <this repo id or folder> --task {run['task']}", ""]
    # the results page starts with its own "# title"; the card keeps it as the card's title
    return "---\n" + data.to_yaml() + "\n---\n\n" + results_md.rstrip() + "\n\n" + "\n".join(usage)


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the model folder of a finished run (default `<run_dir>/hub`); atomic: all files or none."""
    from mmcl import __version__
    from mmcl.reporting import load_metrics, results_markdown, write_json_atomic, write_text_atomic

    run_dir = Path(run_dir)
    matrix, meta = load_metrics(run_dir)
    cfg = RunConfig.load(run_dir / "config.yaml")
    ckpt = final_checkpoint(run_dir, matrix.T)
    with open(ckpt / "state.json") as f:
        state = json.load(f)
    config = {
        "mmcl_version": __version__, "backbone": cfg.backbone, "approach": cfg.baseline, "scenario": cfg.scenario,
        "task_sequence": meta.get("task_sequence", cfg.task),
        "tasks": [{"name": n, "modality": m, "classes": c}
                  for n, m, c in zip(meta["tasks"], meta["modalities"], meta["classes"])],
        "image_shape": meta.get("image_shape"), "approach_state": state.get("extra", {}), "run": cfg.to_dict(),
    }
    out = Path(out) if out else run_dir / "hub"
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(ckpt / "model.safetensors", tmp / "model.safetensors")
    write_json_atomic(tmp / CONFIG_FILE, config)
    shutil.copyfile(run_dir / "metrics.json", tmp / "metrics.json")
    png = run_dir / "accuracy_matrix.png"
    if not png.is_file():
        from mmcl.reporting import plot_accuracy_matrix

        plot_accuracy_matrix(matrix, png)
    shutil.copyfile(png, tmp / "accuracy_matrix.png")
    title = f"{config['task_sequence']} · {cfg.backbone} · {cfg.baseline}"
    write_text_atomic(tmp / "README.md", model_card(config, results_markdown(matrix, title, meta), matrix.summary()))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def push_to_hub(run_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Export the run and upload its model folder; the token comes from huggingface_hub's usual places
    (HF_TOKEN, `huggingface-cli login`) unless given, and is never printed."""
    from huggingface_hub import HfApi

    if str(repo_id).count("/") != 1 or not all(str(repo_id).split("/")):
        raise ValueError(f"--repo_id / --hub_model_id '{repo_id}' is not a Hub repo id (OWNER/NAME)")
    folder = export_run(run_dir)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=list(EXPORT_FILES),
                          commit_message=f"mmcl: {Path(run_dir).name}")
    except Exception as e:  # noqa: BLE001 - offline, no token, no rights: the same advice; the export stays
        raise HubError(f"cannot upload to the Hub repo '{repo_id}' ({_offline_hint()}{type(e).__name__}: {e}); "
                       f"the model folder is ready in {folder}") from e
    return f"https://huggingface.co/{repo_id}"


def _offline_hint() -> str:
    return "HF_HUB_OFFLINE=1, set HF_HUB_OFFLINE=0 to use the Hub; " if os.environ.get("HF_HUB_OFFLINE") == "1" else ""


def resolve_model_folder(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"'{path}' is not an mmcl model folder: {CONFIG_FILE} missing "
                                    f"(make one with `mmcl push RUN_DIR` or mmcl.hub.export_run)")
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"--model '{name_or_path}' is neither a model folder nor a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(name_or_path), revision=revision, allow_patterns=list(EXPORT_FILES)))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, no rights
        raise HubError(f"--model '{name_or_path}': cannot download it from the Hub ({_offline_hint()}"
                       f"{type(e).__name__}: {e})") from e


def read_config(folder: Path) -> tuple[dict[str, Any], RunConfig]:
    with open(folder / CONFIG_FILE) as f:
        config = json.load(f)
    return config, RunConfig.from_dict(config["run"], source=str(folder / CONFIG_FILE))


def layout_sequence(config: dict[str, Any]):
    """A task sequence with the saved layout and empty splits: enough to build the model."""
    from datasets import Dataset

    from mmcl.data.sequence import Task, TaskSequence

    empty = Dataset.from_dict({"label": []})
    tasks = [Task(i, t["name"], t["modality"], list(t["classes"]), empty, empty, empty)
             for i, t in enumerate(config["tasks"])]
    return TaskSequence(config["task_sequence"], tasks)


def load_into(approach, folder: Path, config: dict[str, Any]) -> None:
    """The folder's weights (safetensors) and approach state into a freshly built approach."""
    from mmcl.rundir import load_approach_weights

    # state first: a grown approach (LEViT's experts) rebuilds its modules before the weights load
    approach.load_extra_state(config.get("approach_state", {}))
    load_approach_weights(approach, folder / "model.safetensors")


def from_pretrained(name_or_path: str | os.PathLike, revision: str | None = None, device: str = "cpu"):
    """The approach (an nn.Module in eval mode) of an exported run, from a folder or a Hub repo id.

    `model.predict(batch, task_id)` gives logits; `model.model.backbone` preprocesses and collates
    inputs; `model.mmcl_config` is the folder's config.json."""
    from mmcl.approaches import APPROACHES
    from mmcl.backbones import BackboneSpec, build_backbone
    from mmcl.data.sequence import get_scenario

    folder = resolve_model_folder(name_or_path, revision)
    config, cfg = read_config(folder)
    seq = layout_sequence(config)
    shape = tuple(config["image_shape"]) if config.get("image_shape") else None
    backbone = build_backbone(cfg, BackboneSpec(modalities=tuple(seq.modalities), image_shape=shape))
    approach = APPROACHES.get(cfg.baseline)(backbone, seq, get_scenario(cfg.scenario), cfg).to(device)
    load_into(approach, folder, config)
    approach.eval()
    approach.mmcl_config = config
    return approach


def evaluate_pretrained(name_or_path: str | os.PathLike, task: str | None = None, data_dir: str | None = None,
                        revision: str | None = None) -> tuple[list[float], list[float]]:
    """(accuracy row, macro-F1 row) of an exported model on its task sequence's test sets."""
    from mmcl.engine import Engine

    folder = resolve_model_folder(name_or_path, revision)
    config, cfg = read_config(folder)
    cfg.task = task or cfg.task
    cfg.data_dir = data_dir or cfg.data_dir
    cfg.save_checkpoints, cfg.progress, cfg.resume = False, False, None
    engine = Engine(cfg)
    engine.setup()
    found = [(t.name, t.classes) for t in engine.seq]
    saved = [(t["name"], t["classes"]) for t in config["tasks"]]
    if found != saved:
        raise ValueError(f"--task {cfg.task} gives tasks {[n for n, _ in found]} but the model was trained on "
                         f"{[n for n, _ in saved]} (names and classes must match, in order)")
    load_into(engine.accelerator.unwrap_model(engine.approach), folder, config)
    acc, f1, _ = engine.evaluate_all()
    return acc, f1
