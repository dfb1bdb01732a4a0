import pytest

from mmcl.config import RunConfig
from mmcl.flags import build_config
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
    from mmcl.flags import resolve_options

    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        resolve_options(RunConfig.from_dict({"nope": 1}))


def test_cli_rejects_unknown_approach_with_suggestion(capsys):
    from mmcl.cli import main

    assert main(["run", "--task", "split_digits", "--baseline", "lwff"]) == 2
    assert "Did you mean 'lwf'" in capsys.readouterr().err


def test_predefined_args_follow_pycontinual_and_flags_still_win():
    cfg = build_config({"task": "asc", "backbone": "bert_adapter", "baseline": "ewc", "use_predefine_args": True})
    assert (cfg.ntasks, cfg.num_train_epochs, cfg.learning_rate, cfg.bert_adapter_size) == (19, 10, 5e-5, 2000)
    assert cfg.lamb == 5000 and cfg.select_best is True and cfg.scenario == "til"
    cfg = build_config({"task": "asc", "backbone": "bert_adapter", "baseline": "ewc", "use_predefine_args": True,
                        "ntasks": 3, "bert_adapter_size": 64})
    assert (cfg.ntasks, cfg.bert_adapter_size) == (3, 64)
    assert build_config({"task": "asc", "backbone": "bert_adapter", "baseline": "ewc"}).ntasks is None


def test_asc_bing_domains_train_three_times_longer():
    from conftest import SHARED_DATA
    from mmcl.data import ReaderContext, load_task_sequence

    if not (SHARED_DATA / "asc").is_dir():
        pytest.skip("PyContinual ASC data not found")
    seq = load_task_sequence("asc", ReaderContext(data_dir=SHARED_DATA, ntasks=4, idrandom=0))
    factors = {t.name: t.info.get("epoch_multiplier", 1.0) for t in seq}
    assert factors == {"XuSemEval14_laptop": 1.0, "XuSemEval14_rest": 1.0, "Bing9domains_HitachiRouter": 3.0,
                       "Bing9domains_CanonS100": 3.0}


@pytest.mark.parametrize("flag,value", [("optimizer", "adam"), ("lr_scheduler", "step"), ("mixed_precision", "fp8"),
                                        ("learning_rate", 0.0), ("memory_size", -1)])
def test_bad_settings_fail_before_any_work_naming_the_flag(flag, value):
    from mmcl.flags import resolve_options, validate_options

    cfg = resolve_options(RunConfig.from_dict({"baseline": "replay", "backbone": "vit", flag: value}))
    with pytest.raises(ValueError, match=f"--{flag}"):
        cfg.validate()
        validate_options(cfg)  # an option: its method checks it
