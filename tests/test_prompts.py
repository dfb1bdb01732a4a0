"""CODA-Prompt, L2P, DualPrompt on a frozen vit; the prompted token forward; --freeze_backbone; ImageNet-R."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_image_sequence, tiny_config

from mmcl.approaches.prompting import mask_past_classes, orthogonal_rows, parse_layers
from mmcl.engine import Engine
from mmcl.rundir import RunDir

PROMPT_FLAGS = dict(scenario="cil", vit_depth=2, coda_layers="0-1", coda_pool_size=10, coda_length=4,
                    l2p_pool_size=6, l2p_length=2, l2p_top_k=3, dualprompt_g_layers="0", dualprompt_e_layers="1",
                    dualprompt_g_length=2, dualprompt_e_length=3, num_train_epochs=1, save_checkpoints=False)


def make_engine(tmp_path, baseline, num_tasks=2, **overrides):
    cfg = tiny_config(tmp_path, baseline=baseline, **{**PROMPT_FLAGS, **overrides})
    engine = Engine(cfg, sequence=synthetic_image_sequence(num_tasks=num_tasks, n_train=32, n_test=16, size=8))
    engine.setup()
    return engine


def batch_of(engine, task, n=8):
    return engine.collate([task.train[i] for i in range(n)])


def backbone_state(approach):
    return {k: v.clone() for k, v in approach.model.backbone.state_dict().items()}


# -- the shared forward -----------------------------------------------------------------------

def test_prompt_free_path_is_timm_forward_and_prefixes_change_it(tmp_path):
    engine = make_engine(tmp_path, "l2p")
    enc = engine.approach.model.backbone.eval()
    vit = enc.model
    batch = batch_of(engine, engine.seq[0])
    x = batch["pixel_values"]
    tokens, mask = enc.encode_tokens(batch)
    assert mask is None and torch.equal(tokens, vit.forward_features(x))
    assert torch.equal(enc.pool_tokens(tokens, mask), enc(batch))  # the query is the backbone's own forward
    D = vit.embed_dim
    pk, pv = torch.randn(8, 3, D, requires_grad=True), torch.randn(8, 3, D, requires_grad=True)
    out, _ = enc.encode_tokens(batch, {1: (pk, pv)})
    assert out.shape == vit.forward_features(x).shape and not torch.allclose(out, vit.forward_features(x))
    out.sum().backward()
    assert pk.grad.abs().sum() > 0 and pv.grad.abs().sum() > 0
    # a zero key and value still take softmax mass (score 0): the attention output shrinks, not unchanged
    zero, _ = enc.encode_tokens(batch, {1: (torch.zeros(8, 1, D), torch.zeros(8, 1, D))})
    assert not torch.allclose(zero, vit.forward_features(x))


def test_parse_layers_and_bad_layer_names_the_flag():
    assert parse_layers("0-2,4", 6, "coda_layers") == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="--coda_layers.*4 layers"):
        parse_layers("0-4", 4, "coda_layers")
    with pytest.raises(ValueError, match="--l2p_x"):
        parse_layers("a", 4, "l2p_x")


def test_mask_past_classes_sets_only_earlier_classes_to_minus_inf():
    logits = torch.randn(3, 6)
    masked = mask_past_classes(logits, 2)
    assert torch.isinf(masked[:, :2]).all() and torch.equal(masked[:, 2:], logits[:, 2:])
    assert torch.equal(mask_past_classes(logits, 0), logits)


# -- CODA-Prompt ------------------------------------------------------------------------------

def test_orthogonal_rows_are_orthonormal_and_orthogonal_to_earlier():
    gen = torch.Generator().manual_seed(0)
    prev = torch.randn(5, 16)  # not orthonormal, like trained components
    new = orthogonal_rows(prev, 4, gen)
    assert new.shape == (4, 16)
    assert torch.allclose(new @ new.T, torch.eye(4), atol=1e-5)
    assert (new @ prev.T).abs().max() < 1e-5
    with pytest.raises(ValueError, match="orthogonal"):
        orthogonal_rows(prev, 12, gen)


def test_coda_new_slice_is_orthogonal_to_trained_earlier_slices(tmp_path):
    engine = make_engine(tmp_path, "coda_prompt", num_tasks=2)
    a = engine.approach
    pool = a.pool
    a.before_task(engine.seq[0])
    with torch.no_grad():  # "training" moves the first slice away from its orthonormal start
        for plist in (pool.components, pool.keys, pool.attention):
            plist[0].add_(0.3 * torch.randn_like(plist[0]))
    a.before_task(engine.seq[1])
    for plist in (pool.components, pool.keys, pool.attention):
        for li in range(len(pool.layers)):
            old = plist[0][li].reshape(a.slice_sizes[0], -1)
            new = plist[1][li].reshape(a.slice_sizes[1], -1)
            assert (new @ old.T).abs().max() < 1e-5
            assert torch.allclose(new @ new.T, torch.eye(len(new)), atol=1e-5)
    assert [p.requires_grad for p in pool.keys] == [False, True]


def test_coda_alpha_shape_and_range(tmp_path):
    engine = make_engine(tmp_path, "coda_prompt", num_tasks=2)
    a = engine.approach
    a.before_task(engine.seq[0])
    a.before_task(engine.seq[1])
    batch = batch_of(engine, engine.seq[1])
    q = a.query(batch)
    comps, keys, att = a.pool_in_use(a.pool, 1)
    alpha = a.alpha(q, keys, att)
    assert alpha.shape == (len(a.pool.layers), 8, sum(a.slice_sizes[:2]))
    assert alpha.min() >= -1 - 1e-6 and alpha.max() <= 1 + 1e-6
    expected = F.cosine_similarity(q[3] * att[1, 2], keys[1, 2], dim=0)
    assert torch.allclose(alpha[1, 3, 2], expected, atol=1e-6)
    assert comps.shape == (len(a.pool.layers), sum(a.slice_sizes[:2]), 4, a.encoders["image"].token_dim)


@pytest.mark.parametrize("baseline,frozen", [("coda_prompt", ("components", "keys", "attention")),
                                             ("dualprompt", ("e_prompts", "e_keys"))])
def test_earlier_tasks_prompts_do_not_change_while_later_tasks_train(tmp_path, baseline, frozen):
    engine = make_engine(tmp_path, baseline, num_tasks=2, weight_decay=0.1, learning_rate=1e-2)
    a = engine.approach
    engine.train_task(engine.seq[0])
    before = {name: getattr(a.pool, name)[0].detach().clone() for name in frozen}
    current = {name: getattr(a.pool, name)[1].detach().clone() for name in frozen}
    engine.train_task(engine.seq[1])
    for name in frozen:
        assert torch.equal(getattr(a.pool, name)[0], before[name]), name
        assert not torch.equal(getattr(a.pool, name)[1], current[name]), name


@pytest.mark.parametrize("baseline", ["coda_prompt", "l2p", "dualprompt"])
def test_backbone_is_bit_identical_after_a_continual_run(tmp_path, baseline):
    engine = make_engine(tmp_path, baseline, num_tasks=2, weight_decay=0.05, learning_rate=1e-2)
    start = backbone_state(engine.approach)
    prompts_start = {n: p.detach().clone() for n, p in engine.approach.named_parameters()
                     if not n.startswith("model.backbone")}
    engine.rundir = RunDir.open(engine.cfg, engine.accelerator)
    for task in engine.seq:
        engine.train_task(task)
    end = backbone_state(engine.approach)
    assert start.keys() == end.keys()
    for k in start:
        assert torch.equal(start[k], end[k]), k
    changed = [n for n, p in engine.approach.named_parameters() if n in prompts_start and not torch.equal(p, prompts_start[n])]
    assert changed, "nothing outside the backbone trained"
    trainable = {id(p) for p in engine.approach.parameters_to_train()}
    assert not any(id(p) in trainable for p in engine.approach.model.backbone.parameters())


@pytest.mark.parametrize("baseline", ["coda_prompt", "l2p", "dualprompt"])
def test_past_class_logits_are_masked_in_the_training_loss(tmp_path, baseline):
    engine = make_engine(tmp_path, baseline, num_tasks=2)
    a = engine.approach
    a.before_task(engine.seq[0])
    task = engine.seq[1]
    a.before_task(task)
    batch = batch_of(engine, task)
    a.zero_grad()
    a.train()
    loss = a.training_step(batch, task)
    loss.backward()
    w = a.model.heads.heads[0].weight
    assert w.grad[: task.class_offset].abs().sum() == 0  # past classes: no gradient
    assert w.grad[task.class_offset : task.class_offset + task.num_classes].abs().sum() > 0
    # the CE part equals a softmax over the current task's classes only
    with torch.no_grad():
        torch.manual_seed(0)
        features, aux = a.prompt_features(batch, a.query(batch), task)
        logits = a.model.heads(features)[:, task.class_offset : task.class_offset + task.num_classes]
        ce = F.cross_entropy(logits, batch["labels"] - task.class_offset)
        total = a.training_step(batch, task)
    assert torch.allclose(total, ce + (aux if aux is not None else 0), atol=1e-5)


# -- L2P --------------------------------------------------------------------------------------

def test_l2p_selects_exactly_top_k_prompts_and_only_they_matter(tmp_path):
    engine = make_engine(tmp_path, "l2p", num_tasks=2)
    a = engine.approach.eval()
    batch = batch_of(engine, engine.seq[0])
    q = a.query(batch)
    idx, sim = a.select(q, a.pool)
    k = a.cfg.l2p_top_k
    assert idx.shape == (8, k) and all(len(set(row.tolist())) == k for row in idx)
    full = F.cosine_similarity(q[:, None], a.pool.prompt_keys[None], dim=-1)
    assert torch.allclose(sim, full.gather(1, idx))
    assert (full.topk(k).values[:, -1:] <= sim + 1e-7).all()
    assert (sim.min(1).values[:, None] >= full.masked_fill(torch.zeros_like(full, dtype=torch.bool).scatter(1, idx, True),
                                                            -2).max(1, keepdim=True).values - 1e-7).all()
    features, _ = a.prompt_features(batch, q, None)
    unused = sorted(set(range(a.cfg.l2p_pool_size)) - set(idx.flatten().tolist()))
    if unused:
        with torch.no_grad():
            a.pool.prompts[unused].add_(5.0)
        assert torch.allclose(a.prompt_features(batch, q, None)[0], features)
    with torch.no_grad():
        a.pool.prompts[idx[0, 0]].add_(5.0)
    assert not torch.allclose(a.prompt_features(batch, q, None)[0][0], features[0])


def test_l2p_top_k_bigger_than_the_pool_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--l2p_top_k"):
        make_engine(tmp_path, "l2p", l2p_top_k=9)


# -- DualPrompt -------------------------------------------------------------------------------

def test_dualprompt_test_time_selection_takes_the_nearest_learned_key(tmp_path):
    engine = make_engine(tmp_path, "dualprompt", num_tasks=3)
    a = engine.approach.eval()
    batch = batch_of(engine, engine.seq[0])
    q = a.query(batch)
    a.before_task(engine.seq[1])  # tasks 0 and 1 learned so far
    with torch.no_grad():
        a.pool.e_keys[0].copy_(-q[0])
        a.pool.e_keys[1].copy_(q[0])
        a.pool.e_keys[2].copy_(q[0] * 2)  # not learned yet: must never be chosen
    chosen = a.select(q, a.pool)
    assert chosen[0] == 1 and (chosen < 2).all()
    with pytest.raises(ValueError, match="share layers"):
        make_engine(tmp_path, "dualprompt", dualprompt_e_layers="0-1")


# -- finetune / joint with --freeze_backbone -------------------------------------------------

def test_freeze_backbone_trains_only_the_head(tmp_path):
    engine = make_engine(tmp_path, "finetune", freeze_backbone=True)
    start = backbone_state(engine.approach)
    head = engine.approach.model.heads.heads[0].weight.detach().clone()
    engine.train_task(engine.seq[0])
    assert all(torch.equal(v, backbone_state(engine.approach)[k]) for k, v in start.items())
    assert not torch.equal(head, engine.approach.model.heads.heads[0].weight)
    engine.approach.train()
    assert not engine.approach.model.backbone.training


def test_prompt_approaches_refuse_encoders_without_standard_attention(tmp_path):
    for baseline in ("coda_prompt", "dualprompt"):
        with pytest.raises(ValueError, match="--backbone: prompts go inside self-attention.*convit"):
            make_engine(tmp_path, baseline, backbone="convit")
    with pytest.raises(ValueError, match="--backbone: prompt tokens go between.*cannot take extra tokens"):
        make_engine(tmp_path, "l2p", backbone="convit")


# -- ImageNet-R reader ------------------------------------------------------------------------

def write_image_folders(root, classes=6, per_class=10, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "imagenet-r" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 255, (size, size + 4 * (i % 2), 3), dtype=np.uint8))
            img.save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_imagenet_r_reader_splits_classes_into_tasks(tmp_path):
    from mmcl.data import READERS, ReaderContext

    root = write_image_folders(tmp_path)
    read = READERS.get("imagenet_r")
    params = dict(num_classes=6, classes_per_task=2, image_size=12, test_fraction=0.2, valid_fraction=0.1)
    seq = read(params, ReaderContext(data_dir=root, seed=0))
    assert len(seq) == 3 and [t.classes for t in seq][0] == ["n00000000", "n00000001"]
    t = seq[0]
    assert (len(t.train), len(t.valid), len(t.test)) == (14, 2, 4)
    assert np.asarray(t.train[0]["image"]).shape == (12, 12, 3)
    assert sorted(set(t.train["label"])) == [0, 1]
    # disjoint splits: the same seed gives the same split, another seed another
    again = read(params, ReaderContext(data_dir=root, seed=0))
    assert np.array_equal(np.asarray(again[0].test["image"]), np.asarray(t.test["image"]))
    shuffled = read(params, ReaderContext(data_dir=root, seed=0, idrandom=1))
    assert [c for task in shuffled for c in task.classes] != [c for task in seq for c in task.classes]
    assert sorted(c for task in shuffled for c in task.classes) == sorted(c for task in seq for c in task.classes)
    capped = read({**params, "max_eval_per_task": 3}, ReaderContext(data_dir=root, max_train_per_task=5, ntasks=2))
    assert len(capped) == 2 and (len(capped[0].train), len(capped[0].test)) == (5, 3)
    with pytest.raises(ValueError, match="num_classes 200"):
        read({**params, "num_classes": 200}, ReaderContext(data_dir=root))


def test_imagenet_r_task_files_and_missing_data(tmp_path):
    from mmcl.data import DataNotFoundError, ReaderContext, load_task_sequence, task_spec

    for n, per in ((5, 40), (10, 20), (20, 10)):
        spec = task_spec(f"imagenet_r_{n}")
        assert spec["reader"] == "imagenet_r" and spec["params"]["classes_per_task"] == per
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="class folders"):
        load_task_sequence("imagenet_r_10", ReaderContext(data_dir=tmp_path / "empty"))
    bad = write_image_folders(tmp_path / "bad", classes=2, per_class=2)
    (bad / "imagenet-r" / "n00000000" / "broken.jpg").write_bytes(b"not an image")
    from mmcl.data import READERS

    with pytest.raises(ValueError, match="broken.jpg"):
        READERS.get("imagenet_r")(dict(num_classes=2, classes_per_task=2, image_size=8), ReaderContext(data_dir=bad))


def test_a_prompt_method_without_prompt_features_cannot_be_built():
    from mmcl.approaches.prompting import PromptApproach

    class Incomplete(PromptApproach):
        name = "incomplete"

    with pytest.raises(TypeError, match="prompt_features"):
        Incomplete(None, None, None, None)
