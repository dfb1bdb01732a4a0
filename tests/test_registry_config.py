import pytest

from mmcl.config import RunConfig, build_config
from mmcl.registry import Registry, UnknownNameError


def test_unknown_names_suggest_closest():
    from mmcl.approaches import APPROACHES
    from mmcl.backbones import BACKBONES
    from mmcl.data import SCENARIOS, TASK_SEQUENCES

    with pytest.raises(UnknownNameError, match=r"Did you mean 'ewc'"):
        APPROACHES.get("ewcc")
    with pytest.raises(UnknownNameError, match=r"--baseline"):
        APPROACHES.get("ewcc")
    with pytest.raises(UnknownNameError, match=r"'bert_adapter'"):
        BACKBONES.get("bert_adaptor")
    with pytest.raises(UnknownNameError, match=r"'split_fmnist'"):
        TASK_SEQUENCES.get("split_fmnst")
    with pytest.raises(UnknownNameError, match=r"'til_classification'"):
        SCENARIOS.get("til_clasification")


def test_registry_aliases_and_duplicates():
    reg = Registry("thing")

    @reg.register("alpha", aliases=("a",))
    def alpha():
        return 1

    assert reg.get("a") is alpha and reg.canonical("a") == "alpha"
    assert "a" in reg and "b" not in reg
    with pytest.raises(ValueError, match="twice"):
        reg.register("alpha")(lambda: 2)


def test_pycontinual_scenario_names():
    from mmcl.data import get_scenario

    assert get_scenario("til_classification").name == "til"
    assert get_scenario("dil_classification").name == "dil"
    assert get_scenario("cil").task_id_at_test is False


def test_config_precedence_task_defaults_then_flags():
    cfg = build_config({"task": "split_digits", "baseline": "ewc"})
    spec_default = cfg.num_train_epochs
    assert cfg.baseline == "ewc"
    cfg2 = build_config({"task": "split_digits", "num_train_epochs": 7})
    assert cfg2.num_train_epochs == 7 and spec_default != 7


def test_config_unknown_key_is_named():
    with pytest.raises(ValueError, match="learning_rat.*learning_rate"):
        build_config({"learning_rat": 1.0})
    with pytest.raises(ValueError, match="unknown setting"):
        RunConfig.from_dict({"nope": 1})


def test_cli_rejects_unknown_approach_with_suggestion(capsys):
    from mmcl.cli import main

    assert main(["run", "--task", "split_digits", "--baseline", "lwff"]) == 2
    assert "Did you mean 'lwf'" in capsys.readouterr().err
