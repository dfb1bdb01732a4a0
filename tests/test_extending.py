"""Adding an approach is one file: a throw-away approach with one option, registered here, gets its own flag
group, its own validation, and runs end to end through `mmcl run` — no other file touched."""
from dataclasses import dataclass

import pytest

from conftest import synthetic_image_sequence, tiny_config
from mmcl.approaches import APPROACHES
from mmcl.approaches.base import Approach, trainable_named_parameters
from mmcl.options import Options, option


@dataclass
class AnchorOptions(Options):
    anchor_weight: float = option(0.5, "weight of the pull towards the previous task's weights")

    def validate(self) -> None:
        if self.anchor_weight < 0:
            raise ValueError(f"--anchor_weight must be >= 0, got {self.anchor_weight}")


class L2Anchor(Approach):
    """Pull the weights towards those after the previous task."""

    name = "throwaway_anchor"
    Options = AnchorOptions
    weights_seen: list[float] = []

    def before_task(self, task):
        super().before_task(task)
        self.anchor = {n: p.detach().clone() for n, p in trainable_named_parameters(self.model).items()}
        L2Anchor.weights_seen.append(self.opts.anchor_weight)

    def training_step(self, batch, task):
        loss = self.model.loss(batch)
        if task.id > 0:
            loss = loss + self.opts.anchor_weight * sum(((p - self.anchor[n]) ** 2).sum()
                                                        for n, p in trainable_named_parameters(self.model).items())
        return loss


@pytest.fixture
def registered():
    """Register for this test only, so the registry other tests see stays as shipped."""
    APPROACHES.register()(L2Anchor)
    L2Anchor.weights_seen = []
    yield L2Anchor
    APPROACHES._items.pop(L2Anchor.name)


def test_a_new_approach_gets_its_flag_group_and_runs_end_to_end(registered, tmp_path, capsys):
    from mmcl.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--baseline", "throwaway_anchor", "--help"])
    help_text = capsys.readouterr().out
    assert "anchor options (throwaway_anchor):" in help_text
    assert "--anchor_weight" in help_text and "pull towards the previous task's weights" in help_text
    assert "--lamb" not in help_text  # EWC's options belong to EWC's help

    flags = ["run", "--task", "split_digits", "--ntasks", "2", "--max_train_per_task", "32", "--backbone", "vit",
             "--vit_embed_dim", "32", "--vit_depth", "1", "--vit_heads", "2", "--patch_size", "4", "--baseline",
             "throwaway_anchor", "--num_train_epochs", "1", "--no-progress", "--output_dir", str(tmp_path)]
    assert main(flags + ["--anchor_weight", "-1", "--run_name", "bad"]) == 2
    assert "--anchor_weight must be >= 0, got -1.0" in capsys.readouterr().err
    assert main(flags + ["--anchor_weight", "2.5", "--run_name", "ok"]) == 0
    assert registered.weights_seen == [2.5, 2.5]  # the option reached the approach, task after task
    import yaml

    assert yaml.safe_load((tmp_path / "ok" / "config.yaml").read_text())["anchor_weight"] == 2.5


def test_every_option_has_help_and_one_owner_class(registered):
    """Each flag is declared once (one group in --help), with a help line."""
    import dataclasses

    from mmcl.config import RunConfig
    from mmcl.flags import all_option_classes
    from mmcl.options import declaring_class, field_help

    run = RunConfig.field_names()
    for cls in all_option_classes():
        for f in dataclasses.fields(cls):
            assert field_help(f), f"{cls.__name__}.{f.name} has no help"
            assert f.name not in run, f"{f.name} is both a run setting and an option of {cls.__name__}"
            assert declaring_class(cls, f.name) is not None
    assert "anchor_weight" in {f.name for c in all_option_classes() for f in dataclasses.fields(c)}


def test_the_engine_gives_the_approach_its_options_and_the_run_settings(registered, tmp_path):
    from mmcl.engine import Engine

    engine = Engine(tiny_config(tmp_path, baseline="throwaway_anchor", anchor_weight=0.25, lamb=9.0),
                    sequence=synthetic_image_sequence())
    engine.setup()
    approach = engine.approach
    assert isinstance(approach.opts, AnchorOptions) and approach.opts.anchor_weight == 0.25
    assert approach.cfg.learning_rate == 3e-3 and not hasattr(approach.opts, "lamb")
    assert "lamb" not in engine.cfg.options  # another approach's option is not this run's


def test_the_readme_example_approach_runs(tmp_path):
    """The README's "Adding an approach" code, as printed, registers and trains."""
    import re

    from conftest import ROOT
    from mmcl.engine import Engine

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# mmcl/approaches/l2_anchor.py\n.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    try:
        cfg = tiny_config(tmp_path, baseline="l2_anchor", l2_weight=0.1, num_train_epochs=1)
        matrix = Engine(cfg, sequence=synthetic_image_sequence()).run()
        assert matrix.rows_done == 2
    finally:
        APPROACHES._items.pop("l2_anchor", None)
