"""The reproduction registry (configs/reproduce/*.yaml) and scripts/reproduce.py: every entry is a runnable
protocol with its published figure (or a reason there is none); the table puts the paper's figure beside
ours and says when they are not comparable; the smoke of every entry runs (slow)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce.py"
REGISTRY = ROOT / "configs" / "reproduce"
SHARED_DATA = ROOT.parent / "shared" / "data"
CONFIGS = sorted(REGISTRY.glob("*.yaml"))


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


reproduce = _load_script()


def _ids(paths):
    return [p.stem for p in paths]


def test_the_registry_holds_the_issues_protocols():
    # issue #20: DyTox CIFAR-100 10 steps, CODA-Prompt / L2P / DualPrompt ImageNet-R 10 tasks, CTR ASC and DSC,
    # LEViT split MNIST
    assert {p.stem for p in CONFIGS} >= {"dytox_cifar100_10", "coda_prompt_imagenet_r_10", "l2p_imagenet_r_10",
                                         "dualprompt_imagenet_r_10", "ctr_asc", "ctr_dsc", "levit_split_mnist"}


@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_an_entry_is_a_valid_protocol_and_smoke(path):
    config = reproduce.load_config(path)
    full = reproduce.check_run(reproduce.run_values(config, smoke=False), str(path))
    smoke = reproduce.check_run(reproduce.run_values(config, smoke=True), f"{path} smoke")
    assert full.baseline == smoke.baseline  # the smoke shrinks the paper's method, it does not swap it
    for name, fig in config["published"].items():
        assert fig["metric"] in reproduce.SUMMARY_FIELDS
        assert fig["source"].strip()
        assert isinstance(fig["value"], float) or fig["missing"].strip(), name
    if config["smoke"]["stand_in"]:
        # a stand-in smoke changes the data or the weights the paper used
        changed = {k for k, v in config["smoke"]["run"].items() if config["run"].get(k) != v}
        assert changed & {"task", "pretrained", "bert_model"}, "stand_in: true but the smoke keeps data and weights"


def test_the_published_figures_are_the_papers():
    figures = {p.stem: {k: f["value"] for k, f in reproduce.load_config(p)["published"].items()} for p in CONFIGS}
    assert figures["dytox_cifar100_10"] == {"Avg": 71.50, "Last": 57.76}  # the erratum's fair figures
    assert figures["coda_prompt_imagenet_r_10"] == {"final accuracy": 75.45}
    assert figures["l2p_imagenet_r_10"] == {"final accuracy": 69.29}
    assert figures["dualprompt_imagenet_r_10"] == {"final accuracy": 71.32}
    assert figures["ctr_asc"] == {"Acc": 89.47, "MF1": 83.62}
    assert figures["ctr_dsc"] == {"Acc": 89.31, "MF1": 88.75}
    assert figures["levit_split_mnist"] == {"accuracy": None}


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "entry.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _entry() -> dict:
    return yaml.safe_load((REGISTRY / "dytox_cifar100_10.yaml").read_text())


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("smoke"), "[smoke]: missing"),
    (lambda d: d["published"]["Last"].update(value=None), "[published.Last.missing]"),
    (lambda d: d["published"]["Last"].update(metric="last_acc"), "[published.Last.metric]"),
    (lambda d: d["published"]["Last"].pop("source"), "[published.Last.source]"),
    (lambda d: d["published"]["Last"].update(value="57.76"), "[published.Last.value]"),
    (lambda d: d.update(typo=1), "[typo]: unknown"),
    (lambda d: d["run"].pop("baseline"), "[run.baseline]: missing"),
    (lambda d: d["run"].update(output_dir="x"), "[run.output_dir]: set by scripts/reproduce.py"),
    (lambda d: d["smoke"].pop("why"), "[smoke.why]"),
])
def test_a_bad_entry_is_refused_naming_the_file_and_field(tmp_path, edit, field):
    doc = _entry()
    edit(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(reproduce.ReproduceError, match=r"entry\.yaml") as e:
        reproduce.load_config(path)
    assert field in str(e.value)


@pytest.mark.parametrize("flag, value, says", [
    ("lamb", 5000, "'lamb' is not an option of --baseline dytox"),   # EWC's: would be dropped by mmcl run
    ("dytox_finetune_epochs", -1, "dytox_finetune_epochs"),
    ("vit_depthh", 6, "vit_depthh"),
    ("learning_rate", "fast", "learning_rate"),
    ("task", "cifar1000_10", "cifar1000_10"),
])
def test_a_flag_mmcl_run_would_not_take_is_refused(tmp_path, flag, value, says):
    doc = _entry()
    doc["run"][flag] = value
    config = reproduce.load_config(_write(tmp_path, doc))
    with pytest.raises(reproduce.ReproduceError, match="entry.yaml") as e:
        reproduce.check_run(reproduce.run_values(config, smoke=False), str(config["_path"]))
    assert says in str(e.value)


def test_smoke_values_override_and_a_null_drops_a_flag():
    config = reproduce.load_config(REGISTRY / "coda_prompt_imagenet_r_10.yaml")
    full, smoke = reproduce.run_values(config, False), reproduce.run_values(config, True)
    assert full["pretrained"].startswith("vit_base_patch16_224") and "pretrained" not in smoke
    assert (full["task"], smoke["task"]) == ("imagenet_r_10", "split_digits")
    assert smoke["learning_rate"] == full["learning_rate"]  # what the smoke does not name stays the paper's


def _fake_run(run_dir: Path, status: str = "complete", **summary) -> Path:
    run_dir.mkdir(parents=True)
    doc = {"status": status, "summary": summary or None, "meta": {"failure": {"message": "loss is nan"}}}
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    return run_dir


def test_the_table_puts_the_papers_figure_beside_ours(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", acc_final_weighted=58.004, aia_weighted=70.0, acc_final=1.0)
    rc = reproduce.main([str(REGISTRY / "dytox_cifar100_10.yaml"), "--from_run", str(run), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| Avg (aia_weighted) | 71.50 | 70.00 | mmcl − paper -1.50; the paper first claimed 73.66 |" in out
    assert "| Last (acc_final_weighted) | 57.76 | 58.00 | mmcl − paper +0.24; the paper first claimed 60.67 |" in out
    assert "erratum_distributed.md" in out and "NOT comparable" not in out
    doc = json.loads((tmp_path / "dytox_cifar100_10.json").read_text())
    assert doc["comparable"] and [(r["paper"], r["mmcl"]) for r in doc["rows"]] == [(71.5, 70.0), (57.76, 58.004)]
    assert (tmp_path / "dytox_cifar100_10.md").read_text().count("\n| ") == 3  # header and two rows


def test_a_smoke_table_says_it_is_not_comparable_and_a_missing_figure_says_why(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", acc_final_weighted=34.65)
    rc = reproduce.main([str(REGISTRY / "levit_split_mnist.yaml"), "--smoke", "--from_run", str(run),
                         "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("| accuracy"))
    assert row.startswith("| accuracy (acc_final_weighted) | — | 34.65 | smoke run (stand-in data or weights, "
                          "shrunk): NOT comparable to the paper; no published figure: not in our copy")
    assert "SMOKE RUN: MNIST is not on the CPU machine" in out
    assert not json.loads((tmp_path / "levit_split_mnist-smoke.json").read_text())["comparable"]


def test_a_metric_the_run_did_not_write_is_shown_as_missing(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", acc_final=80.0)  # an older metrics.json without the weighted fields
    assert reproduce.main([str(REGISTRY / "coda_prompt_imagenet_r_10.yaml"), "--from_run", str(run),
                           "--out", str(tmp_path)]) == 0
    assert "| 75.45 | — | metrics.json has no summary.acc_final_weighted |" in capsys.readouterr().out


def test_a_failed_run_is_not_tabulated(tmp_path, capsys):
    run = _fake_run(tmp_path / "run", status="failed")
    rc = reproduce.main([str(REGISTRY / "ctr_asc.yaml"), "--from_run", str(run), "--out", str(tmp_path)])
    assert rc == 1 and "the run is failed (loss is nan)" in capsys.readouterr().err
    assert not (tmp_path / "ctr_asc.json").exists()


def test_missing_data_for_a_full_run_says_which_and_where(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MMCL_DATA", raising=False)
    config = str(REGISTRY / "dytox_cifar100_10.yaml")
    assert reproduce.main([config, "--data_dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs CIFAR-100, binary version" in err and f"--data_dir {tmp_path}" in err and "cifar-100-binary" in err
    assert reproduce.main([config, "--out", str(tmp_path / "out")]) == 2
    assert "pass --data_dir DIR (or set MMCL_DATA)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_finished_full_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "train.bin").write_bytes(b"")
    _fake_run(tmp_path / "out" / "dytox_cifar100_10", acc_final_weighted=1.0)
    rc = reproduce.main([str(REGISTRY / "dytox_cifar100_10.yaml"), "--data_dir", str(tmp_path),
                         "--out", str(tmp_path / "out")])
    assert rc == 2 and "holds a run already" in capsys.readouterr().err


def test_print_command_gives_the_mmcl_run_line(tmp_path, capsys):
    rc = reproduce.main([str(REGISTRY / "dytox_cifar100_10.yaml"), "--print_command", "--data_dir", str(tmp_path),
                         "--out", str(tmp_path), "--", "--seed", "1"])
    line = capsys.readouterr().out.strip()
    assert rc == 0 and line.startswith("mmcl run --task cifar100_10 --scenario cil --backbone convit --baseline dytox")
    assert "--lr_reference_batch 512" in line and "--dytox_finetune_tab" in line and line.endswith("--seed 1")
    assert f"--data_dir {tmp_path}" in line and "--overwrite" not in line


def test_the_docs_page_lists_every_entry():
    page = (ROOT / "docs" / "reproduce.md").read_text()
    assert [p.name for p in CONFIGS if p.name not in page] == []


# -- the smokes: every entry runs end to end on this CPU (a few minutes in all) --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_the_smoke_runs_and_prints_the_papers_figure_beside_ours(path, tmp_path):
    config = reproduce.load_config(path)
    cmd = [sys.executable, str(SCRIPT), str(path), "--smoke", "--out", str(tmp_path)]
    if config["smoke"].get("uses_data"):
        if not SHARED_DATA.is_dir():
            pytest.skip(f"{path.name}'s smoke reads the real data: no {SHARED_DATA}")
        cmd += ["--data_dir", str(SHARED_DATA)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / f"{path.stem}-smoke.json").read_text())
    summary = json.loads((tmp_path / f"{path.stem}-smoke" / "metrics.json").read_text())["summary"]
    assert summary["tasks_done"] == summary["num_tasks"] >= 2
    for row, (name, fig) in zip(doc["rows"], config["published"].items()):
        assert row["paper"] == fig["value"] and row["mmcl"] == summary[fig["metric"]] is not None
        assert "NOT comparable to the paper" in row["note"]
        assert f"| {row['metric']} | {reproduce.fmt(fig['value'])} | {reproduce.fmt(row['mmcl'])} |" in done.stdout
    assert "its numbers are NOT comparable to the paper's" in done.stdout
