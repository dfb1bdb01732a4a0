"""Bad command lines get one clear line naming the flag (exit 2), before any data or model work where the
flag alone is wrong, and leave no run directory behind. Each case is a row of docs/bad-inputs.md, which
`test_every_row_of_the_bad_input_table_names_an_existing_test` keeps honest."""
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from mmcl.cli import main

VIT = ["--task", "split_digits", "--backbone", "vit", "--baseline", "finetune"]

CASES = {
    "unknown-approach": (["--baseline", "ewcc"], "Unknown approach 'ewcc' (--baseline). Did you mean 'ewc'?"),
    "unknown-backbone": (["--backbone", "vitt"], "Unknown backbone 'vitt' (--backbone). Did you mean 'vit'"),
    "unknown-task": (["--task", "split_digit"], "Unknown task sequence 'split_digit' (--task). Did you mean 'split_digits'"),
    "unknown-scenario": (["--scenario", "tii"], "Unknown scenario 'tii' (--scenario). Did you mean 'til'?"),
    "bad-choice": (["--optimizer", "adam"], "--optimizer must be one of adamw, sgd, got 'adam'"),
    "bad-precision": (["--mixed_precision", "fp8"], "--mixed_precision must be one of no, bf16, fp16, got 'fp8'"),
    "zero-rate": (["--learning_rate", "0"], "--learning_rate must be > 0, got 0.0"),
    "negative-memory": (VIT[:4] + ["--baseline", "replay", "--memory_size", "-1"], "--memory_size must be >= 0, got -1"),
    "push-without-id": (["--push_to_hub"], "--push_to_hub needs --hub_model_id OWNER/NAME"),
    "unknown-tracker": (VIT + ["--report_to", "tensorbord"], "--report_to: unknown tracker(s) tensorbord; choose from"),
    "unsupported-scenario": (["--scenario", "cil", "--baseline", "hat"], "--baseline hat supports scenarios til, dil, not 'cil'"),
    "wrong-backbone-for-approach": (["--task", "split_digits", "--backbone", "convit", "--baseline", "coda_prompt"],
                                    "--backbone: prompts go inside self-attention, and TimmConvitBackbone's blocks"),
    "ntasks-out-of-range": (VIT + ["--ntasks", "9"], "--ntasks 9: split_digits has 5 tasks"),
    "hub-id-offline": (["--backbone", "bert", "--bert_model", "someone/missing-model", "--ntasks", "1"],
                       "--bert_model 'someone/missing-model': cannot load it (HF_HUB_OFFLINE=1: only local or cached models)"),
    "timm-name-offline": (VIT + ["--pretrained", "vit_nonexistent_xyz"],
                          "--pretrained 'vit_nonexistent_xyz': neither a local path nor a timm model"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_flag_is_one_line_naming_it(case, tmp_path, capsys):
    argv, message = CASES[case]
    code = main(["run", *argv, "--output_dir", str(tmp_path / "runs"), "--run_name", "x", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("mmcl: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs" / "x").exists()  # nothing left behind


@pytest.mark.parametrize("argv, message", [
    (["--lerning_rate", "1"], "unrecognized arguments: --lerning_rate"),
    (["--learning_rate", "abc"], "argument --learning_rate: invalid float value: 'abc'"),
], ids=["unknown-flag", "not-a-number"])
def test_argparse_rejects_unknown_and_mistyped_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_an_unknown_setting_in_a_task_yaml_names_the_file_and_the_closest_setting(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "tasks" / "split_digits.yaml").read_text())
    spec["defaults"] = {"lerning_rate": 0.1}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", "--task", str(path), "--backbone", "vit", "--baseline", "finetune"]) == 2
    err = capsys.readouterr().err
    assert f"{path} [defaults]: unknown setting 'lerning_rate'. Did you mean learning_rate?" in err


def test_every_row_of_the_bad_input_table_names_an_existing_test():
    table = (ROOT / "docs" / "bad-inputs.md").read_text()
    refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]+)\])?`", table)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 30 and len(refs) >= len(rows)
    for file, name, param in refs:
        source = (ROOT / file).read_text()
        assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} is not a test"
        if param:  # every case id in the table is spelled out in its test file
            assert param in source, f"{file}::{name}[{param}]: no such case"


def test_an_option_of_another_method_is_ignored_with_a_warning_naming_its_owners(capsys):
    """One flag list for several approaches (PyContinual's scripts, compare.py) keeps working, loudly."""
    from mmcl.flags import parse_run_args

    values = parse_run_args(VIT + ["--lamb", "10", "--no-hat_binarize", "--learning_rate", "0.1"])
    err = capsys.readouterr().err
    assert "mmcl: warning: ignoring --lamb: an option of --baseline ewc" in err
    assert "ignoring --no-hat_binarize: an option of --baseline ctr, --baseline hat" in err
    assert "lamb" not in values and values["learning_rate"] == 0.1
