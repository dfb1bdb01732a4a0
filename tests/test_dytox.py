"""DyTox: task tokens and heads per task, herding memory, distillation weight, CIL/TIL inference."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_image_sequence, tiny_config, toy_text_sequence
from mmcl.approaches.dytox import DyToxModel, distillation_weight
from mmcl.engine import Engine
from mmcl.memory import herding_order


def dytox_engine(tmp_path, scenario="cil", **kw):
    cfg = tiny_config(tmp_path, baseline="dytox", backbone="convit", scenario=scenario, memory_size=20,
                      save_checkpoints=False, **kw)
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=3))
    engine.setup()
    return engine


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def watch_finetuning(approach):
    """Record, at the balanced fine-tuning's optimiser step, which parameters require gradients, which the
    optimiser holds, whether the encoder is in eval mode; and which parameters the fine-tuning changed."""
    m, seen = approach.model, {}
    names = {id(p): n for n, p in m.named_parameters()}
    make_step, finetune = approach.optimizer_step, approach.balanced_finetune

    def optimizer_step(opt, params=None, **kw):
        seen["requires_grad"] = {n for n, p in m.named_parameters() if p.requires_grad}
        seen["optimised"] = {names[id(p)] for g in opt.param_groups for p in g["params"]}
        seen["lr"] = sorted({g["lr"] for g in opt.param_groups})
        seen["encoder_training"] = m.backbone.training
        return make_step(opt, params, **kw)

    def balanced_finetune(task):
        seen["before_finetuning"] = start = snapshot(m)
        finetune(task)
        seen["changed"] = {n for n, p in m.named_parameters() if not torch.equal(p, start[n])}

    approach.optimizer_step, approach.balanced_finetune = optimizer_step, balanced_finetune
    return seen


def train_two_tasks(engine) -> tuple[set, dict]:
    """Tasks 0 and 1 trained: (the parameters that moved while task 1 trained, before its balanced fine-tuning;
    `watch_finetuning`'s record of that fine-tuning)."""
    engine.train_task(engine.seq[0])
    before = snapshot(engine.approach.model)
    seen = watch_finetuning(engine.approach)
    engine.train_task(engine.seq[1])
    return {n for n, p in seen["before_finetuning"].items() if not torch.equal(p, before[n])}, seen


@pytest.mark.parametrize("flags", [{}, {"dytox_finetune_tab": False}, {"dytox_finetune_old": False}])
def test_balanced_finetuning_trains_what_the_reference_trains(tmp_path, flags):
    """Default (reference `freeze_ft: [sab]`): the patch and position embeddings and the SABs frozen; the TAB,
    every task token and every head seen so far trained. The flags give back mmcl's earlier variants."""
    engine = dytox_engine(tmp_path, vit_depth=3, learning_rate=1e-2, num_train_epochs=1, dytox_finetune_epochs=1,
                          **flags)
    approach, m = engine.approach, engine.approach.model
    o = approach.opts
    if not flags:  # the built approach's defaults are the reference's (20 epochs as the paper; 1 here)
        assert (o.dytox_finetune_tab, o.dytox_finetune_old, o.dytox_finetune_lr_scale, o.dytox_herding,
                o.dytox_tab_in_depth, o.dytox_div_weight) == (True, True, 0.1, "all", True, 0.1)
        assert type(o)().dytox_finetune_epochs == 20
    # while task 1 trains, task 0's token and head stay fixed (the reference's freeze_task: [old_task_tokens,
    # old_heads]); the new token and head, the TAB and the encoder learn
    trained_in_task, seen = train_two_tasks(engine)
    assert not any(n.startswith(("task_tokens.0", "heads.0.")) for n in trained_in_task)
    for prefix in ("task_tokens.1", "heads.1.", "tab.", "backbone.model.blocks.0.", "backbone.model.blocks.1."):
        assert any(n.startswith(prefix) for n in trained_in_task), prefix
    tab, old = flags.get("dytox_finetune_tab", True), flags.get("dytox_finetune_old", True)
    trained = {"task_tokens.1", "heads.1.0.weight", "heads.1.0.bias", "heads.1.1.weight", "heads.1.1.bias"}
    if old:
        trained |= {"task_tokens.0", "heads.0.0.weight", "heads.0.0.bias", "heads.0.1.weight", "heads.0.1.bias"}
    if tab:
        trained |= {n for n, _ in m.named_parameters() if n.startswith("tab.")}
    assert seen["requires_grad"] == seen["optimised"] == trained
    assert seen["lr"] == [pytest.approx(1e-3)]  # 0.1 x the learning rate
    assert not seen["encoder_training"]  # the frozen SABs in eval mode, as the reference's freeze("sab")
    encoder = {n for n, _ in m.named_parameters() if n.startswith("backbone.")}
    assert {"backbone.model.patch_embed.proj.weight", "backbone.model.pos_embed",
            "backbone.model.blocks.0.attn.qk.weight", "backbone.model.blocks.1.attn.qk.weight"} <= encoder
    assert not encoder & seen["requires_grad"]
    assert not any(n.startswith(("divergence.", "task_tokens.2", "heads.2.")) for n in seen["requires_grad"])
    # and the fine-tuning did move what it trains (the optimiser's view is not all there is)
    assert seen["changed"] <= trained and {"task_tokens.0", "heads.0.1.weight"} & seen["changed"] == (
        {"task_tokens.0", "heads.0.1.weight"} if old else set())
    assert any(n.startswith("tab.") for n in seen["changed"]) == tab


@pytest.mark.parametrize("tab_in_depth", [True, False])
def test_depth_counts_the_task_attention_block(tmp_path, tab_in_depth):
    """--vit_depth 3: 2 gated-positional SABs + the TAB (paper: depth 6 = 5 SABs + 1 TAB); without
    --dytox_tab_in_depth, convit's 3 blocks (2 gated-positional, 1 plain) and the TAB on top."""
    engine = dytox_engine(tmp_path, vit_depth=3, dytox_tab_in_depth=tab_in_depth)
    m = engine.approach.model
    kinds = [type(block.attn).__name__ for block in m.backbone.model.blocks]
    assert kinds == (["GPSA", "GPSA"] if tab_in_depth else ["GPSA", "GPSA", "MHSA"])
    assert any(n.startswith("backbone.model.blocks.2.") for n, _ in m.named_parameters()) == (not tab_in_depth)
    batch = next(iter(engine.loader(engine.seq[0].test, 4, shuffle=False)))
    calls = []
    hooks = [b.register_forward_hook(lambda *_: calls.append(1)) for b in m.backbone.model.blocks]
    m.embeddings(batch, [0])
    assert len(calls) == len(kinds)  # every encoder block kept runs, then the TAB
    for h in hooks:
        h.remove()


def test_herding_on_the_newest_embedding_alone_is_an_option(tmp_path):
    engine = dytox_engine(tmp_path, dytox_herding="last")
    task = engine.seq[1]
    assert engine.approach.herding_features(task).shape == (len(task.train), engine.approach.model.tab.q.in_features)


def test_herding_ranks_on_the_concatenated_embeddings_of_all_task_tokens(tmp_path):
    """The reference's icarl_all: after task t the ranking features are [e_0; ...; e_t], width (t + 1) x D."""
    engine = dytox_engine(tmp_path, dytox_finetune_epochs=0, num_train_epochs=1)
    assert engine.approach.opts.dytox_herding == "all"  # the default
    approach, m = engine.approach, engine.approach.model
    engine.train_task(engine.seq[0])
    task = engine.seq[1]
    ranked = []
    features_of = approach.herding_features
    approach.herding_features = lambda t: ranked.append(features_of(t)) or ranked[-1]
    engine.train_task(task)
    (features,) = ranked
    width = m.task_tokens[0].shape[-1]
    assert features.shape == (len(task.train), 2 * width)
    batch = approach.batch_from_rows([task.train[i] for i in range(3)])
    m.eval()
    with torch.no_grad():
        emb = m.embeddings(batch, [0, 1])
    torch.testing.assert_close(features[:3], emb.flatten(1), rtol=1e-4, atol=1e-5)
    # the memory keeps, per new class, the first rows of the herding order on these features
    targets = np.asarray(task.train["target"])
    kept = {row for t, row, _ in approach.memory.items if t == 1}
    expected = set()
    for c in np.unique(targets):
        rows = np.flatnonzero(targets == c)
        expected |= set(rows[herding_order(features[rows], 5)].tolist())  # 20 rows / 4 classes
    assert kept == expected


def test_dytox_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--dytox_herding must be one of all, last"):
        dytox_engine(tmp_path, dytox_herding="token")


def test_dytox_cpu_preset_is_the_cpu_tuning():
    from mmcl.flags import build_config

    cfg = build_config({"task": "split_digits", "baseline": "dytox", "backbone": "convit", "preset": "dytox_cpu"})
    assert cfg.preset == "dytox_cpu"
    reference = build_config({"task": "split_digits", "baseline": "dytox", "backbone": "convit"})
    changed = {k for k in cfg.options if cfg.options[k] != reference.options[k]}
    assert changed and changed <= {"dytox_finetune_lr_scale", "dytox_finetune_tab", "dytox_finetune_old",
                                   "dytox_herding", "dytox_tab_in_depth"}


def test_balanced_finetune_steps_on_the_global_batch(tmp_path):
    """k processes each run the whole fine-tuning on k x the batch: the same steps as one process."""
    engine = dytox_engine(tmp_path, train_batch_size=4, dytox_finetune_epochs=1)
    approach = engine.approach
    engine.train_task(engine.seq[0])
    approach.before_task(engine.seq[1])
    sizes = []
    batch_of = approach.batch_of
    approach.batch_of = lambda data, rows: sizes.append(len(rows)) or batch_of(data, rows)

    real = approach._accelerator

    class TwoProcesses:  # the world size the approach reads; everything else is the real accelerator's
        num_processes, process_index = 2, 1

        def __getattr__(self, name):
            return getattr(real, name)

    approach._accelerator = TwoProcesses()
    assert approach.world == (2, 1)
    approach.balanced_finetune(engine.seq[1])
    assert len(approach.memory) == 20
    assert sizes == [8, 8, 4]  # every memory row once in the epoch, in batches of 2 processes x 4


def test_herding_picks_the_example_closest_to_the_running_mean():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    order = herding_order(x, 10)
    assert len(order) == len(set(order)) == 10
    xn = F.normalize(x, dim=1)
    target, total = xn.mean(0), torch.zeros(6)
    for i, j in enumerate(order):  # brute force: each pick minimises the distance of the running mean
        dist = [((total + xn[c]) / (i + 1) - target).norm().item() if c not in order[:i] else np.inf
                for c in range(40)]
        assert j == int(np.argmin(dist))
        total += xn[j]
    # the herded prefix tracks the class mean better than random picks of the same size
    herded = (xn[order].mean(0) - target).norm()
    random = np.mean([(xn[torch.randperm(40)[:10]].mean(0) - target).norm().item() for _ in range(50)])
    assert herded < random


def test_memory_keeps_its_size_and_class_balance(tmp_path):
    engine = dytox_engine(tmp_path)
    approach = engine.approach
    for task in engine.seq:
        engine.train_task(task)
        counts = approach.memory.class_counts()
        assert len(approach.memory) <= 20
        assert sorted(counts) == list(range(2 * (task.id + 1)))
        assert max(counts.values()) - min(counts.values()) <= 1


def test_distillation_weight_is_old_over_seen_classes(tmp_path):
    assert [distillation_weight(2 * t, 2 * (t + 1)) for t in (1, 2, 3, 4)] == [1 / 2, 2 / 3, 3 / 4, 4 / 5]
    engine = dytox_engine(tmp_path, dytox_div_weight=0.0)
    approach, m = engine.approach, engine.approach.model
    engine.train_task(engine.seq[0])
    task = engine.seq[1]
    approach.before_task(task)  # the old model is now a copy of the model: KD is exactly 0
    batch = next(iter(engine.loader(approach.train_dataset(task), 16, shuffle=False)))
    m.eval()  # no dropout either way; same numbers as the copy
    loss = approach.training_step(batch, task)
    logits = m.logits(m.embeddings(batch, [0, 1])).float()
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(batch["labels"], 4).float())
    torch.testing.assert_close(loss, (1 - 2 / 4) * bce, rtol=1e-5, atol=1e-6)


def test_distillation_is_the_elementwise_mean_kl_on_old_classes_and_new_tokens_start_fresh(tmp_path):
    engine = dytox_engine(tmp_path, dytox_div_weight=0.0)
    approach, m = engine.approach, engine.approach.model
    engine.train_task(engine.seq[0])
    task = engine.seq[1]
    approach.before_task(task)
    assert not torch.equal(m.task_tokens[1], m.task_tokens[0])  # its own initialisation, not a copy
    old = approach._old[0]
    with torch.no_grad():  # move the old model away from the new one: KD is no longer 0
        for p in old.heads[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    batch = next(iter(engine.loader(approach.train_dataset(task), 16, shuffle=False)))
    m.eval()
    loss = approach.training_step(batch, task)
    logits = m.logits(m.embeddings(batch, [0, 1])).float()
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(batch["labels"], 4).float())
    p_old = F.softmax(old.logits(old.embeddings(batch, [0])).float(), -1)
    log_q = F.log_softmax(logits[:, :2], -1)
    kd = (p_old * (p_old.log() - log_q)).sum(-1).mean() / 2  # per-example KL over 2 old classes
    assert kd > 1e-3
    torch.testing.assert_close(loss, (1 - 2 / 4) * bce + 2 / 4 * kd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scenario", ["cil", "til"])
def test_inference_shapes_follow_classes_and_tasks(tmp_path, scenario):
    engine = dytox_engine(tmp_path, scenario=scenario)
    approach = engine.approach
    engine.train_task(engine.seq[0])
    engine.train_task(engine.seq[1])
    batch = next(iter(engine.loader(engine.seq[0].test, 8, shuffle=False)))
    approach.eval()
    if scenario == "cil":
        logits = approach.predict(batch, None)
        assert logits.shape == (8, 6)  # all classes of the sequence
        assert torch.isinf(logits[:, 4:]).all() and torch.isfinite(logits[:, :4]).all()  # unseen task 2
    else:
        for u in range(3):
            assert approach.predict(batch, u).shape == (8, engine.seq[u].num_classes)
    matrix_row = engine.evaluate_all()[0]
    assert len(matrix_row) == 3


def test_convit_encoder_tokens_are_the_convit_forward_of_before(tmp_path):
    """Invariant of the move to the TokenEncoder interface: on convit, DyTox's encoder tokens are exactly (bitwise)
    what its own convit code computed before (patch embedding + positions + dropout, then every block kept, no
    [CLS], no final norm), with no key mask, and the TAB reads them unmasked; so convit DyTox runs (predictions,
    weights, memories) and the state-dict keys of its checkpoints are as before."""
    engine = dytox_engine(tmp_path, vit_depth=3)
    m = engine.approach.model
    vit = m.backbone.model
    batch = next(iter(engine.loader(engine.seq[0].test, 8, shuffle=False)))
    m.eval()
    with torch.no_grad():
        x = vit.patch_embed(batch["pixel_values"]) + vit.pos_embed
        x = vit.pos_drop(x)
        for block in vit.blocks:
            x = block(x)
        tokens, mask = m.encoder_tokens(batch)
        assert mask is None and torch.equal(tokens, x)
        e1 = m.tab(m.task_tokens[1].expand(8, -1, -1), x)
        assert torch.equal(m.embeddings(batch, [0, 1])[:, 1:], e1)
    assert m.depth is None and m.tab.heads == 2  # the blocks were removed, not skipped; --vit_heads 2
    assert {n.split(".")[3] for n, _ in m.state_dict().items() if n.startswith("backbone.model.blocks.")} == {"0", "1"}


def text_engine(tmp_path, backbone="bert_frozen", **kw):
    cfg = tiny_config(tmp_path, task="toytext", baseline="dytox", backbone=backbone, scenario="cil", max_seq_length=16,
                      memory_size=8, num_train_epochs=1, dytox_finetune_epochs=1, learning_rate=1e-3,
                      save_checkpoints=False, **kw)
    engine = Engine(cfg, sequence=toy_text_sequence(n_train=16, n_test=8))
    engine.setup()
    return engine


@pytest.mark.parametrize("backbone", ["vit", "bert_frozen"])
def test_dytox_runs_cil_on_vit_and_on_a_frozen_text_encoder(tmp_path, backbone):
    """Two CIL tasks: task 1 trains its own token and head and leaves task 0's as they were (until the balanced
    fine-tuning on the memory, which collates, pads and trains on rows of both tasks); a frozen encoder is
    bitwise unchanged after everything, a ViT's trains except what its --vit_depth - 1 blocks never reach."""
    if backbone == "vit":
        cfg = tiny_config(tmp_path, baseline="dytox", backbone="vit", scenario="cil", vit_depth=2, memory_size=8,
                          num_train_epochs=1, dytox_finetune_epochs=1, save_checkpoints=False)
        engine = Engine(cfg, sequence=synthetic_image_sequence(n_train=16, n_test=8))
        engine.setup()
    else:
        engine = text_engine(tmp_path)
    approach, m = engine.approach, engine.approach.model
    assert m.tab.heads == m.backbone.num_heads  # 2 (--vit_heads), 12 (MiniLM)
    start = snapshot(m)
    in_task, seen = train_two_tasks(engine)
    assert not any(n.startswith(("task_tokens.0", "heads.0.")) for n in in_task)
    assert {"task_tokens.1", "heads.1.1.weight", "tab.q.weight"} <= in_task
    assert {"task_tokens.0", "heads.0.1.weight"} <= seen["changed"]  # the fine-tuning trains every head so far
    assert not any(n.startswith("backbone.") for n in seen["requires_grad"])  # the encoder frozen in it
    after = snapshot(m)
    encoder = {n for n in after if n.startswith("backbone.")}
    moved = {n for n in encoder if not torch.equal(after[n], start[n])}
    if backbone == "bert_frozen":
        assert not moved and not any(p.requires_grad for p in m.backbone.parameters())  # still frozen after
        assert m.depth is None  # every pre-trained layer runs, the TAB on top
    else:
        # --vit_depth 2 counts the TAB: block 0 runs, block 1 and the final norm never do
        assert m.depth == 1 and any(n.startswith("backbone.model.blocks.0.") for n in moved)
        assert not any(n.startswith(("backbone.model.blocks.1.", "backbone.model.norm.")) for n in moved)
    assert len(approach.memory) == 8 and sorted(approach.memory.class_counts()) == [0, 1, 2, 3]
    batch = next(iter(engine.loader(engine.seq[0].test, 8, shuffle=False)))
    approach.eval()
    logits = approach.predict(batch, None)
    assert logits.shape == (8, 4) and torch.isfinite(logits).all()


def test_padding_does_not_change_a_text_example_s_task_embedding():
    """The key mask reaches the encoder and the TAB: an example alone and padded beside a longer one has the
    same task embeddings; the padding does count if the mask is dropped (so the test can fail)."""
    from mmcl.backbones.text import BertEncoder

    torch.manual_seed(0)
    encoder = BertEncoder(None, 16, trainable=False)
    m = DyToxModel(encoder, [2, 2]).eval()
    assert m.depth is None and m.tab.heads == encoder.num_heads == 12  # MiniLM's every layer, its heads
    texts = ["the phone is good", "the big red hotel is not really very old at all"]
    padded = encoder.collate_inputs([dict(encoder.tokenizer(t)) for t in texts])
    alone = encoder.collate_inputs([dict(encoder.tokenizer(texts[0]))])
    assert not padded["attention_mask"][0].all()  # the short one is padded
    with torch.no_grad():
        emb_alone = m.embeddings(alone, [0, 1])[0]
        torch.testing.assert_close(m.embeddings(padded, [0, 1])[0], emb_alone, atol=1e-5, rtol=0)
        x, mask = m.encoder_tokens(padded)
        assert torch.equal(mask, padded["attention_mask"].bool())
        unmasked = m.tab(m.task_tokens[0].expand(2, -1, -1), x)[0, 0]
    assert (unmasked - emb_alone[0]).abs().max() > 1e-3


def test_dytox_on_a_trained_text_encoder_trains_it_and_freezes_it_in_the_balanced_finetuning(tmp_path):
    engine = text_engine(tmp_path, backbone="bert", bert_dropout=0.0)
    approach, m = engine.approach, engine.approach.model
    engine.train_task(engine.seq[0])
    before = snapshot(m)
    seen = watch_finetuning(approach)
    engine.train_task(engine.seq[1])
    in_task = {n for n, p in seen["before_finetuning"].items() if not torch.equal(p, before[n])}
    assert any(n.startswith("backbone.encoder.encoder.layer.5.") for n in in_task)  # the SABs learn in the task
    assert not any(n.startswith("backbone.") for n in seen["requires_grad"]) and not seen["encoder_training"]
    assert not any(n.startswith("backbone.") for n in seen["changed"])
    assert all(p.requires_grad for p in m.backbone.encoder.encoder.parameters())  # trainable again afterwards


class NotATransformer(torch.nn.Module):
    """A backbone with no token interface (a CNN, `dual`)."""

    modality, feature_dim = "image", 8


@pytest.mark.parametrize("backbone", [NotATransformer(), "dual"], ids=["not-a-token-encoder", "dual"])
def test_dytox_needs_a_transformer_encoder(tmp_path, backbone):
    if backbone == "dual":  # refused at start, before any data work: DyTox handles no task on it
        cfg = tiny_config(tmp_path, baseline="dytox", backbone="dual", scenario="cil")
        with pytest.raises(ValueError, match="--baseline dytox handles .* on --backbone dual, not tasks"):
            Engine(cfg, sequence=synthetic_image_sequence()).setup()
        return
    with pytest.raises(ValueError, match="--backbone: .*NotATransformer is not one"):
        DyToxModel(backbone, [2, 2])
