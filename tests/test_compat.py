"""The compatibility matrix (mmcl/compat.py): declarations true to the code, and every claimed cell run."""
import pytest
import torch

from conftest import ROOT, synthetic_image_sequence, tiny_config, toy_text_sequence

from mmcl import compat
from mmcl.data.sequence import TaskSequence
from mmcl.engine import Engine

# small enough for ~1 s a cell; layer options fit both the 2-block vit and the 2-layer BERT
CELL_FLAGS = dict(num_train_epochs=1, train_batch_size=8, eval_batch_size=16, save_checkpoints=False, vit_depth=2,
                  vit_heads=2, patch_size=4, vit_embed_dim=16, max_seq_length=16, bert_adapter_size=4,
                  vit_adapter_size=4, dual_dim=8,
                  memory_size=4, weight_decay=0.0, coda_layers="0-1", coda_pool_size=4, coda_length=2,
                  l2p_pool_size=4, l2p_length=1, l2p_top_k=2, dualprompt_g_layers="0", dualprompt_e_layers="1",
                  dualprompt_g_length=1, dualprompt_e_length=1, dytox_finetune_epochs=1, online_batch_size=4,
                  levit_embed_dim=16, levit_heads=2, levit_mlp_dim=16, levit_latent_dim=4, levit_vae_hidden=16,
                  levit_lr=None, lora_r=2, lora_alpha=4)


def cell_sequence(backbone: str) -> TaskSequence:
    modalities, _ = compat.backbone_declaration(backbone)
    image = synthetic_image_sequence(num_tasks=2, n_train=8, n_test=4, size=8)
    if modalities == ("image",):
        return image
    text = toy_text_sequence(n_train=8, n_test=4)
    if modalities == ("text",):
        return text
    tasks = [text.tasks[0], image.tasks[1]]  # a mixed sequence: one text task, then one image task
    for i, t in enumerate(tasks):
        t.id = i
    return TaskSequence("toymixed", tasks)


@pytest.mark.parametrize("cell", compat.smoke_cells(), ids=lambda c: f"{c.approach}-{c.backbone}-{c.scenario}")
def test_every_claimed_cell_runs(tmp_path, tiny_bert, cell):
    seq = cell_sequence(cell.backbone)
    cfg = tiny_config(tmp_path, task=seq.name, backbone=cell.backbone, baseline=cell.approach, scenario=cell.scenario,
                      bert_model=tiny_bert, **CELL_FLAGS)
    engine = Engine(cfg, sequence=seq)
    engine.setup()
    learn = engine.train_task if engine.scenario.task_boundaries else engine.train_stream
    for task in engine.seq:
        learn(task)
        engine.matrix.set_row(task.id, *engine.evaluate_all())
    acc = engine.matrix.acc
    assert acc.shape == (2, 2) and ((acc >= 0) & (acc <= 100)).all()
    assert all(torch.isfinite(p).all() for p in engine.approach.parameters())


def test_smoke_cells_are_allowed_and_cover_each_approach_and_backbone():
    cells = compat.smoke_cells()
    assert len(set(cells)) == len(cells)
    assert all(compat.verdict(c.backbone, c.approach, c.scenario) is None for c in cells)
    allowed = compat.allowed_cells()
    pairs = {(c.approach, c.backbone) for c in allowed}
    assert pairs == {(c.approach, c.backbone) for c in cells}  # every pair the declarations allow runs somewhere
    assert {(c.approach, c.scenario) for c in allowed} == {(c.approach, c.scenario) for c in cells}


def test_backbone_declarations_match_what_the_backbones_are(tiny_bert):
    from mmcl.backbones import BACKBONES, BackboneSpec, build_backbone
    from mmcl.backbones.adapters import AdapterSites
    from mmcl.backbones.tokens import TokenEncoder
    from mmcl.config import RunConfig

    spec = BackboneSpec(modalities=("text", "image"), image_shape=(8, 8))
    for name in BACKBONES.names():
        built = build_backbone(RunConfig.from_dict(dict(backbone=name, bert_model=tiny_bert, **CELL_FLAGS)), spec)
        modalities, provides = compat.backbone_declaration(name)
        for m, tower in built.towers_by_modality().items():
            assert m in modalities, (name, m)
            actual = {"tokens": isinstance(tower, TokenEncoder) and tower.supports_tokens,
                      "prefix": isinstance(tower, TokenEncoder) and tower.supports_prefix,
                      "insert": isinstance(tower, TokenEncoder) and tower.supports_insert,
                      "adapter_sites": isinstance(tower, AdapterSites)}
            assert {c for c, ok in actual.items() if ok} == set(provides[m]), (name, m)
        assert set(built.towers_by_modality()) == set(modalities), name


def test_the_docs_page_is_the_generated_matrix():
    page = (ROOT / "docs" / "compat.md").read_text()
    assert compat.markdown() in page, "docs/compat.md is stale: run python scripts/render_docs.py"
    assert "✓" in compat.markdown() and "✗" in compat.markdown()


def test_an_undeclared_combination_is_a_no_with_its_reason():
    assert "prompts inside self-attention" in compat.verdict("convit", "coda_prompt", "cil")
    assert "pixels" in compat.verdict("bert", "levit", "online")
    assert compat.verdict("vit", "finetune", "online").startswith("finetune is a method for")
