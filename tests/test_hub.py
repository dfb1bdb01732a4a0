"""Sharing runs: export, Hub push (patched, no network), from_pretrained, mmcl eval."""
import json

import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config
from mmcl.engine import Engine
from mmcl.engine_errors import CheckpointError
from mmcl.hub import EXPORT_FILES, export_run, from_pretrained


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    engine = Engine(tiny_config(tmp, baseline="finetune", scenario="til", run_name="toy"),
                    sequence=synthetic_image_sequence())
    engine.run()
    return engine, tmp / "runs" / "toy"


def test_export_writes_exactly_the_model_folder_with_a_card(toy_run):
    engine, run_dir = toy_run
    folder = export_run(run_dir)
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES)
    config = json.loads((folder / "config.json").read_text())
    assert config["approach"] == "finetune" and config["backbone"] == "vit" and config["scenario"] == "til"
    assert [t["classes"] for t in config["tasks"]] == [t.classes for t in engine.seq]
    assert config["image_shape"] == [8, 8]
    card = (folder / "README.md").read_text()
    head = card.split("---")[1]
    assert "library_name: mmcl" in head and "- continual-learning" in head and "- finetune" in head
    assert "## Accuracy matrix" in card
    assert json.loads((folder / "metrics.json").read_text()) == json.loads((run_dir / "metrics.json").read_text())


def test_from_pretrained_gives_identical_logits(toy_run):
    engine, run_dir = toy_run
    folder = export_run(run_dir, run_dir.parent / "toy-model")
    model = from_pretrained(folder)
    batch = next(iter(engine.loader(engine.seq[1].test, 32, shuffle=False)))
    engine.approach.eval()
    for task_id in (0, 1):
        assert torch.equal(model.predict(batch, task_id), engine.approach.predict(batch, task_id))


def test_from_pretrained_downloads_repo_ids_through_huggingface_hub(toy_run, monkeypatch):
    import huggingface_hub

    _, run_dir = toy_run
    folder = export_run(run_dir, run_dir.parent / "toy-snapshot")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = from_pretrained("someone/toy-finetune", revision="main")
    assert calls == [("someone/toy-finetune", "main", EXPORT_FILES)]
    assert model.mmcl_config["approach"] == "finetune"
    with pytest.raises(FileNotFoundError, match="neither a model folder nor a Hub repo id"):
        from_pretrained(run_dir.parent / "no-such-folder")


def test_push_uploads_exactly_the_export_files_and_never_prints_the_token(toy_run, monkeypatch, capsys):
    from huggingface_hub import HfApi

    _, run_dir = toy_run
    sent = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, **kw):
        sent["repo"] = (repo_id, private, exist_ok, self.token)

    def upload_folder(self, folder_path, repo_id, allow_patterns=None, **kw):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        sent["files"] = [f for f in files if any(Path(f).match(p) for p in allow_patterns)]
        sent["all"] = files

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    from mmcl.cli import main

    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    assert main(["push", str(run_dir), "--repo_id", "someone/toy", "--private"]) == 0
    assert sent["repo"][:3] == ("someone/toy", True, True)
    assert sent["files"] == sent["all"] == sorted(EXPORT_FILES)
    out = capsys.readouterr()
    assert "someone/toy" in out.out and "hf_secret_token_value" not in out.out + out.err
    assert sent["repo"][3] is None  # no token handed over: huggingface_hub reads HF_TOKEN itself


def test_export_of_an_unfinished_run_is_a_clear_error(toy_run, tmp_path):
    import shutil

    _, run_dir = toy_run
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("task_1", "hub"))
    with pytest.raises(CheckpointError, match="--resume"):
        export_run(partial)


def test_mmcl_eval_reproduces_the_last_accuracy_row(tmp_path, capsys):
    """A real registered task sequence, so that `mmcl eval` can load its data by name."""
    from mmcl.cli import main

    cfg = tiny_config(tmp_path, task="split_digits", ntasks=2, num_train_epochs=1, run_name="digits",
                      max_train_per_task=64)
    matrix = Engine(cfg).run()
    run_dir = tmp_path / "runs" / "digits"
    assert main(["push", str(run_dir)]) == 2  # neither a repo id nor --export_only
    assert main(["push", str(run_dir), "--export_only"]) == 0
    assert main(["eval", "--model", str(run_dir / "hub")]) == 0
    printed = capsys.readouterr().out.splitlines()
    row = [float(v) for v in next(line for line in printed if line.startswith("accuracy:")).split()[1:3]]
    assert row == pytest.approx([round(float(a), 2) for a in matrix.acc[-1]], abs=0.006)


def test_push_to_hub_flag_uploads_at_the_end_of_a_run(tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from mmcl.cli import main

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, folder_path, repo_id, **kw: uploads.append(
        (repo_id, sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir()))))
    flags = ["run", "--task", "split_digits", "--ntasks", "2", "--max_train_per_task", "32", "--backbone", "vit",
             "--vit_embed_dim", "32", "--vit_depth", "1", "--vit_heads", "2", "--patch_size", "4", "--baseline",
             "finetune", "--no-progress", "--output_dir", str(tmp_path), "--run_name", "pushed"]
    assert main(flags + ["--push_to_hub"]) == 2  # no --hub_model_id: a clear error before any work
    assert "--hub_model_id" in capsys.readouterr().err and not (tmp_path / "pushed").exists()
    assert main(flags + ["--push_to_hub", "--hub_model_id", "someone/digits"]) == 0
    assert uploads == [("someone/digits", sorted(EXPORT_FILES))]


def test_hub_failures_name_the_repo_id_and_keep_the_export(toy_run, monkeypatch, capsys):
    """Offline here: the real huggingface_hub calls fail as they would without a network."""
    from huggingface_hub import HfApi

    from mmcl.cli import main

    _, run_dir = toy_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--model", "someone/not-cached-model"]) == 2
    assert "--model 'someone/not-cached-model': cannot download it from the Hub (HF_HUB_OFFLINE=1" in capsys.readouterr().err
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: (_ for _ in ()).throw(
        ConnectionError("no network")))
    assert main(["push", str(run_dir), "--repo_id", "someone/toy"]) == 2
    err = capsys.readouterr().err
    assert "cannot upload to the Hub repo 'someone/toy'" in err and "ConnectionError: no network" in err
    assert f"the model folder is ready in {run_dir / 'hub'}" in err
    assert main(["push", str(run_dir), "--repo_id", "no-owner"]) == 2
    assert "'no-owner' is not a Hub repo id (OWNER/NAME)" in capsys.readouterr().err


def test_the_card_has_a_model_index_huggingface_hub_parses(toy_run):
    from huggingface_hub import ModelCard

    engine, run_dir = toy_run
    folder = export_run(run_dir)
    card = ModelCard.load(folder / "README.md")
    summary = json.loads((run_dir / "metrics.json").read_text())["summary"]
    results = {r.metric_type: r for r in card.data.eval_results}
    expected = {k for k in ("acc_final", "bwt", "fwt", "forgetting", "aia", "acc_final_weighted", "aia_weighted")
                if summary[k] is not None}
    assert expected <= set(results) and "fwt" in results  # TIL: the untrained baseline makes FWT defined
    for key in expected:
        assert results[key].metric_value == pytest.approx(summary[key], abs=1e-4)
        assert results[key].dataset_type == "toy" and results[key].dataset_config == "til"
    assert card.data.library_name == "mmcl" and "continual-learning" in card.data.tags
    assert "## How to use" in card.text and "mmcl eval --model" in card.text
