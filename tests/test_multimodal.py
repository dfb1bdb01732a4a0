"""Mixed text+image sequences on the `dual` backbone: batches per modality, replay of both, errors at start."""
import json

import numpy as np
import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config, toy_text_sequence
from mmcl.data.sequence import TaskSequence
from mmcl.engine import Engine


def mixed_sequence(n_train: int = 32, n_test: int = 16) -> TaskSequence:
    """text, image, text, image: toy text rules and toy images (tasks renumbered by TaskSequence)."""
    text = toy_text_sequence(n_train, n_test).tasks
    images = synthetic_image_sequence(2, n_train=n_train, n_test=n_test, size=8).tasks
    return TaskSequence("toymixed", [text[0], images[0], text[1], images[1]])


def dual_engine(tmp_path, baseline="finetune", scenario="til", seq=None, **overrides) -> Engine:
    values = dict(task="toymixed", backbone="dual", baseline=baseline, scenario=scenario, text_backbone="bert_adapter",
                  bert_adapter_size=8, max_seq_length=16, dual_dim=32, num_train_epochs=1, learning_rate=3e-3,
                  train_batch_size=8, save_checkpoints=False, bert_dropout=0.0)
    values.update(overrides)
    engine = Engine(tiny_config(tmp_path, **values), sequence=seq or mixed_sequence())
    engine.setup()
    return engine


class TowerSpy:
    """Records the input keys every tower's forward receives."""

    def __init__(self, backbone) -> None:
        self.seen = {m: [] for m in backbone.towers}
        for m, tower in backbone.towers.items():
            tower.register_forward_pre_hook(lambda mod, args, m=m: self.seen[m].append(sorted(args[0])))


def test_dual_routes_each_modality_to_its_own_tower(tmp_path):
    engine = dual_engine(tmp_path, "replay", memory_size=40)
    backbone = engine.approach.model.backbone
    spy = TowerSpy(backbone)
    for task in engine.seq:
        engine.train_task(task)
    engine.evaluate_all()
    assert spy.seen["text"] and spy.seen["image"]
    assert all("input_ids" in keys and "pixel_values" not in keys for keys in spy.seen["text"])
    assert all("pixel_values" in keys and "input_ids" not in keys for keys in spy.seen["image"])
    # both towers project into one feature space of --dual_dim
    text_batch = next(iter(engine.loader(engine.seq[0].test, 4, shuffle=False)))
    image_batch = next(iter(engine.loader(engine.seq[1].test, 4, shuffle=False)))
    assert backbone(text_batch).shape == backbone(image_batch).shape == (4, 32)


def test_a_batch_of_rows_from_two_modalities_is_refused(tmp_path):
    engine = dual_engine(tmp_path)
    rows = [engine.seq[0].train[0], engine.seq[1].train[0]]
    with pytest.raises(ValueError, match="one modality"):
        engine.collate(rows)


def test_replay_memory_holds_and_samples_both_modalities(tmp_path):
    engine = dual_engine(tmp_path, "replay", memory_size=40)
    replay = engine.approach
    engine.train_task(engine.seq[0])
    engine.train_task(engine.seq[1])
    in_memory = {engine.seq[t].modality for t, _, _ in replay.memory.items}
    assert in_memory == {"text", "image"}
    replay.before_task(engine.seq[2])
    batches = replay.memory_batches(16)
    assert [b["modality"] for b in batches] == ["text", "image"]  # one batch per modality
    assert sum(b["labels"].numel() for b in batches) == 16
    for b in batches:  # every row of a batch belongs to a task of that batch's modality
        assert {engine.seq[t].modality for t in b["task_ids"].tolist()} == {b["modality"]}
    assert "input_ids" in batches[0] and "pixel_values" in batches[1]
    loss = replay.training_step(next(iter(engine.loader(engine.seq[2].train, 8, shuffle=False))), engine.seq[2])
    assert torch.isfinite(loss)


def test_joint_on_a_mixed_sequence_batches_per_modality(tmp_path):
    from mmcl.data.mixed import ModalityGroups

    engine = dual_engine(tmp_path, "joint")
    data = engine.approach.train_dataset(engine.seq[2])
    assert isinstance(data, ModalityGroups) and len(data) == sum(len(engine.seq[t].train) for t in range(3))
    loader = engine.loader(data, 8, shuffle=True, seed=0)
    mods = [b["modality"] for b in loader]
    assert len(mods) == len(loader) == 4 + 4 + 4 and set(mods) == {"text", "image"}
    task_ids = set()
    for b in loader:
        task_ids |= set(b["task_ids"].tolist())
        assert {engine.seq[t].modality for t in b["task_ids"].tolist()} == {b["modality"]}
    assert task_ids == {0, 1, 2}
    # a single-modality prefix is a plain concatenation, as before
    assert not isinstance(engine.approach.train_dataset(engine.seq[0]), ModalityGroups)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("baseline,scenario", [
    ("ewc", "cil"), pytest.param("finetune", "til", marks=SLOW), pytest.param("ewc", "til", marks=SLOW),
    pytest.param("lwf", "til", marks=SLOW), pytest.param("joint", "til", marks=SLOW),
    pytest.param("replay", "cil", marks=SLOW), pytest.param("lwf", "cil", marks=SLOW),
    pytest.param("finetune", "dil", marks=SLOW), pytest.param("replay", "dil", marks=SLOW),
])
def test_approaches_run_a_mixed_sequence(tmp_path, baseline, scenario):
    seq = mixed_sequence(n_train=16, n_test=8)
    cfg = tiny_config(tmp_path, task="toymixed", backbone="dual", baseline=baseline, scenario=scenario,
                      bert_adapter_size=8, max_seq_length=16, dual_dim=32, num_train_epochs=1, learning_rate=3e-3,
                      train_batch_size=8, save_checkpoints=False, bert_dropout=0.0, lamb=10.0)
    matrix = Engine(cfg, sequence=seq).run()
    assert np.isfinite(matrix.acc).all()
    g = matrix.group_summary({"text": [0, 2], "image": [1, 3]})
    assert g["text"]["bwt"] == pytest.approx(sum(g["text"]["bwt_while"].values()), abs=1e-9)


def test_hat_masks_the_text_tower_and_text_tasks_keep_their_outputs(tmp_path):
    # the preset hat_exact's settings: binary gates and frozen LayerNorms keep outputs bit for bit
    engine = dual_engine(tmp_path, "hat", smax=50, learning_rate=5e-3, num_train_epochs=2, hat_binarize=True,
                         hat_train_layernorm=False)
    hat = engine.approach
    backbone = hat.model.backbone
    assert not any(p.requires_grad for p in backbone.proj["text"].parameters())
    assert not any(p.requires_grad for p in backbone.shared.parameters())
    assert any(p.requires_grad for p in backbone.towers["image"].parameters())
    engine.train_task(engine.seq[0])
    batch = next(iter(engine.loader(engine.seq[0].test, 16, shuffle=False)))
    hat.eval()
    before = hat.predict(batch, 0).clone()
    for task in engine.seq.tasks[1:]:  # an image task, a text task (masked), an image task
        engine.train_task(task)
    hat.eval()
    assert torch.equal(hat.predict(batch, 0), before)
    assert hat.binarized_units[1] == 0 and hat.binarized_units[3] == 0  # image tasks claim no units


@pytest.mark.parametrize("overrides,match", [
    (dict(backbone="vit"), "needs --backbone dual"),
    (dict(backbone="bert_adapter"), "needs --backbone dual"),
    (dict(baseline="dytox", backbone="dual"), "not tasks"),
    (dict(baseline="ctr", backbone="dual"), "not tasks"),
    (dict(text_backbone="vit"), "--text_backbone vit encodes 'image'"),
    (dict(vision_backbone="bert"), "--vision_backbone bert encodes 'text'"),
    (dict(baseline="hat", text_backbone="bert"), "--text_backbone bert"),
])
def test_a_modality_the_backbone_or_approach_cannot_take_fails_before_training(tmp_path, monkeypatch, overrides, match):
    import mmcl.engine

    trained = []
    monkeypatch.setattr(mmcl.engine.Engine, "train_task", lambda self, task: trained.append(task))
    values = dict(task="toymixed", backbone="dual", baseline="finetune", bert_adapter_size=8, max_seq_length=16,
                  dual_dim=32, save_checkpoints=False)
    values.update(overrides)
    with pytest.raises(ValueError, match=match):
        Engine(tiny_config(tmp_path, **values), sequence=mixed_sequence(8, 4)).run()
    assert trained == []


def test_image_tasks_of_different_shapes_fail_at_start(tmp_path):
    a = synthetic_image_sequence(1, size=8).tasks
    b = synthetic_image_sequence(1, size=16).tasks
    b[0].name = "big"
    with pytest.raises(ValueError, match="different image shapes"):
        Engine(tiny_config(tmp_path), sequence=TaskSequence("shapes", a + b)).setup()


# ------------------------------------------------------------------------------- the mixed reader


def write_yaml(path, spec: dict):
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_mixed_reader_interleaves_parts_in_the_given_order(tmp_path):
    from mmcl.data import ReaderContext, load_task_sequence

    spec = {"reader": "mixed", "params": {
        "parts": {"text": {"task": "vader4", "params": {"max_train_per_task": 20, "max_eval_per_task": 10}},
                  "image": {"reader": "split_digits", "params": {"max_train_per_task": 30}}},
        "order": ["image", "text", "text", "image", "image"]}}
    seq = load_task_sequence(write_yaml(tmp_path / "m.yaml", spec), ReaderContext())
    assert [t.modality for t in seq] == ["image", "text", "text", "image", "image"]
    assert [t.name for t in seq] == ["digits_0_1", "amazon", "movie", "digits_2_3", "digits_4_5"]
    assert [t.class_offset for t in seq] == [0, 2, 4, 6, 8]
    assert len(seq[1].train) == 20 and len(seq[0].train) == 30 and seq[1].info["part"] == "text"
    short = load_task_sequence(str(tmp_path / "m.yaml"), ReaderContext(ntasks=2))
    assert [t.name for t in short] == ["digits_0_1", "amazon"]
    # the run's cap reaches every part
    capped = load_task_sequence(str(tmp_path / "m.yaml"), ReaderContext(ntasks=2, max_train_per_task=5))
    assert [len(t.train) for t in capped] == [5, 5]


@pytest.mark.parametrize("params,match", [
    ({"parts": {"a": {"reader": "split_digits"}}, "order": ["a", "b"]}, "unknown part"),
    ({"parts": {"a": {"reader": "split_digits"}, "b": {"reader": "split_digits"}}, "order": ["a", "b"]}, "twice"),
    ({"parts": {"a": {"reader": "split_digits", "task": "vader4"}}, "order": ["a"]}, "exactly one of"),
    ({"parts": {"a": {"reader": "split_digits"}}, "order": ["a"] * 6}, "has 5"),
    ({"parts": {"a": {"reader": "split_digits"}}}, "params.order"),
])
def test_mixed_reader_errors_name_the_problem(tmp_path, params, match):
    from mmcl.data import ReaderContext, load_task_sequence

    path = write_yaml(tmp_path / "bad.yaml", {"reader": "mixed", "params": params})
    with pytest.raises(ValueError, match=match):
        load_task_sequence(path, ReaderContext())


def test_shipped_mixed_sequence_alternates_vader4_and_fmnist():
    from mmcl.data import ReaderContext, load_task_sequence
    from mmcl.data.vision import idx_files

    from pathlib import Path

    if idx_files(Path("/usr/share/datasets/fashion-mnist")) is None:
        pytest.skip("Fashion-MNIST not installed")
    seq = load_task_sequence("mixed_vader4_fmnist", ReaderContext(ntasks=4))
    assert [(t.name, t.modality) for t in seq] == [("amazon", "text"), ("fmnist_0_1", "image"),
                                                    ("movie", "text"), ("fmnist_2_3", "image")]


# ------------------------------------------------------------------------------- NLI


MNLI_ROWS = [
    ("fiction", "The cat sat on the mat.", "A cat is sitting.", "entailment"),
    ("fiction", "He left early.", "He stayed all night.", "contradiction"),
    ("fiction", "She bought a car.", "The car is red.", "neutral"),
    ("fiction", "Nobody agreed.", "Everyone agreed.", "-"),  # no gold label: dropped
    ("travel", "The hotel is by the sea.", "The hotel is near water.", "entailment"),
    ("travel", "Trains run hourly.", "Trains never run.", "contradiction"),
    ("slate", "Prices rose.", "Prices fell.", "contradiction"),
    ("government", "The law passed.", "The law exists.", "entailment"),
    ("telephone", "I called him.", "I spoke to someone.", "neutral"),
]


def write_multinli(folder, rows=MNLI_ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("multinli_1.0_train.jsonl", "multinli_1.0_dev_matched.jsonl"):
        with open(folder / name, "w") as f:
            for genre, s1, s2, label in rows:
                f.write(json.dumps({"genre": genre, "sentence1": s1, "sentence2": s2, "gold_label": label}) + "\n")


def test_nli_reader_builds_premise_hypothesis_pairs_per_genre(tmp_path):
    from mmcl.data import ReaderContext, load_task_sequence

    write_multinli(tmp_path / "multinli_1.0")
    seq = load_task_sequence("nli", ReaderContext(data_dir=tmp_path))
    assert [t.name for t in seq] == ["fiction", "government", "slate", "telephone", "travel"]
    fiction = seq[0]
    assert fiction.classes == ["entailment", "neutral", "contradiction"]
    test = fiction.test  # the matched dev file, whole
    assert test["text"] == ["The cat sat on the mat.", "He left early.", "She bought a car."]
    assert test["text_pair"] == ["A cat is sitting.", "He stayed all night.", "The car is red."]
    assert test["label"] == [0, 2, 1]
    assert len(fiction.train) + len(fiction.valid) == 3  # '-' dropped; valid carved from train
    assert seq[4].test["label"] == [0, 2] and seq[4].test["text_pair"][1] == "Trains never run."
    assert [t.name for t in load_task_sequence("nli", ReaderContext(data_dir=tmp_path, ntasks=2))] == \
        ["fiction", "government"]


def test_nli_reads_glue_tsv_and_per_genre_files(tmp_path):
    from mmcl.data import ReaderContext, load_task_sequence

    glue = tmp_path / "glue" / "MNLI"
    glue.mkdir(parents=True)
    header = "index\tgenre\tsentence1\tsentence2\tgold_label\n"
    for name in ("train.tsv", "dev_matched.tsv"):
        (glue / name).write_text(header + "".join(f"{i}\t{g}\t{a}\t{b}\t{y}\n" for i, (g, a, b, y) in enumerate(MNLI_ROWS)))
    seq = load_task_sequence("nli", ReaderContext(data_dir=tmp_path / "glue"))
    assert seq[0].test["label"] == [0, 2, 1] and seq[0].test["text_pair"][0] == "A cat is sitting."

    per_genre = tmp_path / "pc" / "nli"
    for g in ("fiction", "government", "slate", "telephone", "travel"):
        (per_genre / g).mkdir(parents=True)
        for split in ("train", "dev", "test"):
            recs = {str(i): {"premise": f"{g} premise {i}", "hypothesis": f"{g} hypothesis {i}", "label": i % 3}
                    for i in range(6)}
            (per_genre / g / f"{split}.json").write_text(json.dumps(recs))
    seq = load_task_sequence("nli", ReaderContext(data_dir=tmp_path / "pc"))
    assert len(seq[1].train) == len(seq[1].valid) == len(seq[1].test) == 6
    assert seq[1].test["label"] == [0, 1, 2, 0, 1, 2] and seq[1].test["text"][2] == "government premise 2"


def test_nli_pairs_are_tokenised_as_pairs(tmp_path):
    from mmcl.backbones import BackboneSpec, build_backbone
    from mmcl.data import ReaderContext, load_task_sequence

    write_multinli(tmp_path)
    seq = load_task_sequence("nli", ReaderContext(data_dir=tmp_path, ntasks=1))
    backbone = build_backbone(tiny_config(tmp_path, backbone="bert_frozen", task="nli", max_seq_length=32),
                              BackboneSpec(modalities=("text",)))
    ds = backbone.preprocess(seq[0].test)
    ids = ds[0]["input_ids"]
    tok = backbone.tokenizer
    assert ids.count(tok.sep_token_id) == 2  # [CLS] premise [SEP] hypothesis [SEP]
    decoded = tok.decode(ids)
    assert "cat sat on the mat" in decoded and "a cat is sitting" in decoded
    if "token_type_ids" in ds.column_names:
        assert set(ds[0]["token_type_ids"]) == {0, 1}


def test_nli_missing_data_names_the_layouts(tmp_path):
    from mmcl.data import DataNotFoundError, ReaderContext, load_task_sequence

    with pytest.raises(DataNotFoundError, match="multinli_1.0_train.jsonl"):
        load_task_sequence("nli", ReaderContext(data_dir=tmp_path))
    with pytest.raises(ValueError, match="unknown genre"):
        from mmcl.data.nli import read_nli

        read_nli({"genres": ["fiction", "fictoin"]}, ReaderContext(data_dir=tmp_path))


# ------------------------------------------------------------------------------- per-modality report


def test_bwt_while_splits_a_groups_bwt_by_the_modality_being_trained(tmp_path):
    from mmcl.metrics import AccuracyMatrix
    from mmcl.reporting import write_report

    # text 0, image 1, text 2, image 3
    R = np.array([[80, 10, 10, 10],
                  [70, 90, 10, 10],   # text task 0 loses 10 while image 1 is learned
                  [75, 85, 85, 10],   # text 0 regains 5 while text 2 is learned; image 1 loses 5
                  [60, 80, 81, 95]], dtype=float)  # image 3: text 0 -15, text 2 -4, image 1 -5
    m = AccuracyMatrix(4, ["t0", "i1", "t2", "i3"], acc=R, f1=R)
    g = m.group_summary({"text": [0, 2], "image": [1, 3]})
    assert g["text"]["bwt"] == pytest.approx(((60 - 80) + (81 - 85)) / 2)
    assert g["text"]["bwt_while"]["image"] == pytest.approx((-10 - 15 - 4) / 2)
    assert g["text"]["bwt_while"]["text"] == pytest.approx(5 / 2)
    assert g["image"]["bwt"] == pytest.approx(80 - 90)
    assert g["image"]["bwt_while"] == pytest.approx({"text": -5.0, "image": -5.0})
    write_report(tmp_path, m, {"modalities": ["text", "image", "text", "image"]})
    text = (tmp_path / "results.md").read_text()
    assert "BWT while image trained" in text and "| text | t0, t2 | 70.50 | -12.00 | 2.50 | -14.50 |" in text
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["group_summary"]["image"]["bwt_while"]["text"] == pytest.approx(-5.0)
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 10_000
