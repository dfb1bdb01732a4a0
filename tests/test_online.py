"""The task-free scenario `online`, its baselines and LEViT: what the learner may see, the memories,
expansion, freezing, the gate, resume at hidden boundaries."""
import json

import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config
from mmcl.approaches import APPROACHES
from mmcl.approaches.online import OnlineFinetune, StreamMemory
from mmcl.engine import Engine
from mmcl.rundir import RunDir
from mmcl.stream import StreamBatch, TaskIdLeak, hide_task


def online_engine(tmp_path, baseline="levit", num_tasks=2, n_train=40, **kw):
    # LEViT small, at --learning_rate (levit_lr unset) like the baselines
    values = dict(baseline=baseline, scenario="online", memory_size=20, online_batch_size=10, learning_rate=3e-3,
                  levit_embed_dim=16, levit_heads=2, levit_mlp_dim=16, levit_latent_dim=4, levit_vae_hidden=16,
                  levit_lr=None)
    values.update(kw)
    return Engine(tiny_config(tmp_path, **values), sequence=synthetic_image_sequence(num_tasks, n_train=n_train))


# -- the guard -------------------------------------------------------------------------------------------
def test_hidden_keys_raise_and_the_rest_passes():
    batch = hide_task({"pixel_values": torch.zeros(2, 1, 8, 8), "labels": torch.tensor([0, 3]),
                       "local_labels": torch.tensor([0, 1]), "task_ids": torch.tensor([0, 1])})
    assert set(batch.keys()) == {"pixel_values", "labels"}
    assert batch["labels"].tolist() == [0, 3]
    for probe in (lambda: batch["task_ids"], lambda: batch.get("task_ids"), lambda: "task_ids" in batch,
                  lambda: batch["local_labels"], lambda: batch.id, lambda: batch.task_id):
        with pytest.raises(TaskIdLeak, match="hides task identity"):
            probe()


class Spy(OnlineFinetune):
    """Records what the engine hands over; fails if a task hook is ever called."""

    name = "spy_online"
    seen_keys: list = []
    eval_types: list = []

    def observe(self, batch):
        type(self).seen_keys.append((type(batch), sorted(batch.keys())))
        return super().observe(batch)

    def predict(self, batch, task_id):
        type(self).eval_types.append((type(batch), task_id))
        return super().predict(batch, task_id)

    def before_task(self, task):
        raise AssertionError("before_task called in a task-free stream")

    def after_task(self, task, loader):
        raise AssertionError("after_task called in a task-free stream")


class Peeker(OnlineFinetune):
    name = "peek_online"

    def observe(self, batch):
        _ = batch["task_ids"]  # cheating: a task-free learner must not know the task
        return super().observe(batch)


@pytest.fixture
def extra_approaches():
    APPROACHES.names()  # load the real ones first
    for cls in (Spy, Peeker):
        APPROACHES.register(cls.name)(cls)
    Spy.seen_keys, Spy.eval_types = [], []
    yield
    for cls in (Spy, Peeker):  # other files count the registered approaches
        del APPROACHES._items[cls.name]


def test_no_task_id_reaches_the_learner(tmp_path, extra_approaches):
    engine = online_engine(tmp_path, "spy_online", num_tasks=3, n_train=30)
    matrix = engine.run()
    assert len(Spy.seen_keys) == 9  # 3 tasks x 30 examples in batches of 10: each example once
    assert all(t is StreamBatch and keys == ["labels", "pixel_values"] for t, keys in Spy.seen_keys)
    assert Spy.eval_types and all(t is StreamBatch and tid is None for t, tid in Spy.eval_types)
    assert engine.approach.current_task is None
    # the evaluator still fills the matrix at the hidden boundaries
    assert not torch.isnan(torch.tensor(matrix.acc)).any()
    log = [json.loads(line) for line in (engine.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["segment"] for r in log if r["event"] == "stream"] == [0, 1, 2]


def test_a_learner_reading_task_ids_fails(tmp_path, extra_approaches):
    with pytest.raises(TaskIdLeak):
        online_engine(tmp_path, "peek_online").run()


def test_boundary_approaches_refuse_the_online_scenario(tmp_path):
    with pytest.raises(ValueError, match="supports scenarios til, dil, cil, not 'online'"):
        online_engine(tmp_path, "replay").setup()
    with pytest.raises(ValueError, match="supports scenarios online"):
        Engine(tiny_config(tmp_path, baseline="levit", scenario="cil"), sequence=synthetic_image_sequence()).setup()


# -- memories --------------------------------------------------------------------------------------------
def test_fifo_memory_bound_and_order():
    mem = StreamMemory(5, (1, 2, 2), "fifo")
    for start in range(0, 23, 3):  # batches of 3, 24 examples; each image holds its stream position
        ids = torch.arange(start, start + 3)
        mem.add(ids.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2), ids)
        assert len(mem) <= 5
        x, y = mem.contents()
        newest = int(ids[-1])
        assert y.tolist() == list(range(max(0, newest - 4), newest + 1))  # the last 5, oldest first
        assert torch.equal(x[:, 0, 0, 0].long(), y)
    assert mem.full and int(mem.seen) == 24


def test_reservoir_memory_bound_and_uniform():
    mem = StreamMemory(50, (1, 1, 1), "reservoir", seed=3)
    for start in range(0, 2000, 10):
        ids = torch.arange(start, start + 10)
        mem.add(torch.zeros(10, 1, 1, 1), ids)
        assert len(mem) <= 50
    kept = mem.y.tolist()
    assert len(set(kept)) == 50
    # a uniform sample of 2000: about a quarter from each quarter of the stream
    quarters = [sum(1 for k in kept if q * 500 <= k < (q + 1) * 500) for q in range(4)]
    assert all(4 <= n <= 22 for n in quarters), quarters


def test_successive_draws_on_one_batch_differ_and_are_reproducible():
    mem = StreamMemory(40, (1, 1, 1), "reservoir", seed=5)
    ids = torch.arange(40)
    mem.add(torch.zeros(40, 1, 1, 1), ids)
    first, second = mem.sample(5)[1], mem.sample(5)[1]
    assert int(mem.seen) == 40 and int(mem.draws) == 2  # the same stream position, two draws
    assert first.tolist() != second.tolist()
    # a memory restored from a state dict (as from a checkpoint) draws what the original draws next
    twin = StreamMemory(40, (1, 1, 1), "reservoir", seed=5)
    twin.load_state_dict(mem.state_dict())
    for _ in range(3):
        assert mem.sample(5)[1].tolist() == twin.sample(5)[1].tolist()
    # and the draw counter is what moves it: rewound, it repeats the first draw
    twin.draws.zero_()
    assert twin.sample(5)[1].tolist() == first.tolist()


def test_online_replay_steps_on_one_batch_replay_different_rows(tmp_path):
    engine = online_engine(tmp_path, "online_replay", online_iters=4, replay_batch_size=5, memory_size=40)
    engine.setup()
    er = engine.approach
    batches = list(engine.loader(engine.seq[0].train, 10, shuffle=False))
    for b in batches[:3]:
        er.memory.add(b["pixel_values"], b["labels"])
    drawn, sample = [], er.memory.sample

    def recording(n):
        drawn.append(sample(n))
        return drawn[-1]

    er.memory.sample = recording
    er.observe(hide_task(batches[3]))
    assert len(drawn) == 4  # one draw per step
    for k in range(3):  # the synthetic images are distinct, so equal tensors mean the same rows
        assert not torch.equal(drawn[k][0], drawn[k + 1][0]), f"steps {k + 1} and {k + 2} replayed the same rows"


def test_online_replay_resume_restores_the_memory_and_its_draws(tmp_path):
    kw = dict(num_tasks=2, n_train=30, online_iters=3, replay_batch_size=5, memory_size=20, run_name="r")
    full = online_engine(tmp_path / "a", "online_replay", **kw)
    full.run()
    part = online_engine(tmp_path / "b", "online_replay", **kw)
    part.setup()
    part.rundir = RunDir.open(part.cfg, part.accelerator)
    for task in part.seq.tasks[:1]:  # an interrupted run: the first hidden segment, checkpointed
        part.train_stream(task)
        part.matrix.set_row(task.id, *part.evaluate_all())
        part.checkpoint(task.id)
    resumed = online_engine(tmp_path / "b", "online_replay", resume=str(part.run_dir), **kw)
    resumed.run()
    a, b = full.approach.memory, resumed.approach.memory
    assert int(a.draws) == 3 * 5 and int(b.draws) == int(a.draws)  # 6 batches x 3 steps; the first finds it empty
    for name in ("x", "y", "arrival", "seen", "count"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.sample(5)[0], b.sample(5)[0])


# -- LEViT -----------------------------------------------------------------------------------------------
def test_levit_frozen_components_do_not_change_after_expansion(tmp_path):
    engine = online_engine(tmp_path, num_tasks=2, n_train=60, levit_gamma=0.0)  # gamma 0: expand at every check
    engine.setup()
    levit = engine.approach
    batches = list(engine.loader(engine.seq[0].train, 10, shuffle=True, seed=0))
    for b in batches[:2]:
        levit.observe(hide_task(b))
    assert len(levit.components) == 2 and levit.created_at == [0, 20]  # the memory (20) filled after 2 batches
    assert not any(p.requires_grad for p in levit.components[0].parameters())
    frozen = {n: p.clone() for n, p in levit.components[0].state_dict().items()}
    new = {n: p.clone() for n, p in levit.components[1].state_dict().items()}
    for b in batches[2:3]:
        levit.observe(hide_task(b))
    for n, p in levit.components[0].state_dict().items():
        assert torch.equal(p, frozen[n]), f"frozen component changed: {n}"
    assert any(not torch.equal(p, new[n]) for n, p in levit.components[1].state_dict().items())
    # the trainable set is the current component alone
    assert {id(p) for p in levit.parameters_to_train()} == {id(p) for p in levit.components[1].parameters()}


def test_levit_output_gate_weights_sum_to_one_and_mix_features(tmp_path):
    engine = online_engine(tmp_path, levit_gamma=0.0, levit_fusion="output")  # our earlier variant
    engine.setup()
    levit = engine.approach
    assert levit.model.shared is None  # whole experts, each with its own patch embedding
    for _ in range(2):
        levit.model.add_component()
    comp = levit.components[2]
    with torch.no_grad():
        comp.gate.copy_(torch.tensor([0.3, -1.0, 2.0]))
    w = comp.gate_weights()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6) and (w > 0).all()
    feats = [torch.randn(4, 16) for _ in range(3)]
    expected = comp.classifier(w[0] * feats[0] + w[1] * feats[1] + w[2] * feats[2])
    torch.testing.assert_close(comp.fuse(feats), expected)
    # the gate is learned: it gets a gradient
    comp.fuse(feats).sum().backward()
    assert comp.gate.grad is not None and comp.gate.grad.abs().sum() > 0


def test_levit_elbo_rule_one_distribution_creates_no_new_expert_above_its_vae_loss(tmp_path):
    # our earlier rule (--levit_novelty elbo): one task = one distribution, 120 examples, memory 20: six checks
    elbo = dict(levit_novelty="elbo", levit_fusion="output")
    engine = online_engine(tmp_path, num_tasks=1, n_train=120, levit_gamma=1e9, **elbo)
    engine.setup()
    levit = engine.approach
    batches = [hide_task(b) for b in engine.loader(engine.seq[0].train, 10, shuffle=True, seed=0)]
    for b in batches:
        levit.observe(b)
    scores = [c["score"] for c in levit.checks]
    assert len(levit.checks) == 6 and len(levit.components) == 1
    # now a gamma just above the largest VAE loss it measured on this stream: still one expert
    engine2 = online_engine(tmp_path, num_tasks=1, n_train=120, levit_gamma=max(scores) * 1.01, run_name="g", **elbo)
    engine2.setup()
    for b in [hide_task(b) for b in engine2.loader(engine2.seq[0].train, 10, shuffle=True, seed=0)]:
        engine2.approach.observe(b)
    assert len(engine2.approach.components) == 1
    assert [c["score"] for c in engine2.approach.checks] == pytest.approx(scores)
    # and a gamma below it expands: the test can fail
    engine3 = online_engine(tmp_path, num_tasks=1, n_train=120, levit_gamma=min(scores) * 0.5, run_name="h", **elbo)
    engine3.setup()
    for b in [hide_task(b) for b in engine3.loader(engine3.seq[0].train, 10, shuffle=True, seed=0)]:
        engine3.approach.observe(b)
    assert len(engine3.approach.components) > 1


def pixels(engine, split) -> torch.Tensor:
    return torch.cat([b["pixel_values"] for b in engine.loader(split, 64, shuffle=False)])


def test_levit_latent_distance_is_small_on_its_own_data_and_large_on_shifted_data():
    from mmcl.approaches.levit import VAE, symmetric_kl

    seq = synthetic_image_sequence(2, n_train=160, n_test=64)

    def images(split) -> torch.Tensor:  # the backbone's scaling: pixels to [-1, 1]
        return torch.tensor(split["image"], dtype=torch.float32).unsqueeze(1) / 127.5 - 1

    own, fresh, shifted = images(seq[0].train), images(seq[0].test), images(seq[1].test)  # task 1: other blocks lit
    torch.manual_seed(0)
    vae = VAE(64, 32, 4, layers=2, beta=0.5)
    opt = torch.optim.Adam(vae.parameters(), 1e-2)
    for _ in range(40):
        loss = vae.loss(own[torch.randint(0, len(own), (32,))]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = vae.latent_fit(own)
    same, shift = symmetric_kl(*vae.latent_fit(fresh), *ref), symmetric_kl(*vae.latent_fit(shifted), *ref)
    assert shift > 10 * same, (same, shift)
    assert symmetric_kl(*ref, *ref) == pytest.approx(0.0, abs=1e-6)


def test_levit_latent_rule_keeps_training_on_familiar_data_and_expands_after_the_shift(tmp_path):
    # memory 20: a check every 20 examples; task 0 = examples 0-79, task 1 = 80-159
    kw = dict(n_train=80, online_iters=2)

    def stream(gamma, name):
        engine = online_engine(tmp_path, levit_gamma=gamma, run_name=name, **kw)
        engine.setup()
        for t in range(2):
            for b in engine.loader(engine.seq[t].train, 10, shuffle=True, seed=t):
                engine.approach.observe(hide_task(b))
        return engine.approach

    levit = stream(1e9, "probe")
    scores = {c["position"]: c["score"] for c in levit.checks}
    assert scores[20] == float("inf") and levit.created_at == [0, 20]  # the first check: nothing learned yet
    assert levit.current and not bool(levit.components[1].has_ref)  # the current one kept training
    familiar = [scores[p] for p in (40, 60, 80)]
    novel = [scores[p] for p in (100, 120, 140, 160)]  # memories of task 1 only
    assert min(novel) > 3 * max(familiar), scores
    # a gamma between the two: exactly one more component, created at the first check after the shift
    assert stream((max(familiar) * min(novel)) ** 0.5, "g").created_at == [0, 20, 100]


def levit_with(tmp_path, fusion: str, components: int = 3):
    """A LEViT of `components` components, all but the last frozen as after expansions."""
    engine = online_engine(tmp_path, levit_fusion=fusion, run_name=fusion)
    engine.setup()
    levit = engine.approach
    for _ in range(components - 1):
        levit.freeze_current()
        levit.model.add_component()
        levit.current = True
    return engine, levit


def test_levit_dkf_attention_reuses_the_frozen_modules_and_tokens(tmp_path):
    engine, levit = levit_with(tmp_path, "dkf")
    x = pixels(engine, engine.seq[0].test)[:8]
    first, new = levit.components[0], levit.components[2]
    base = levit.model.component_logits(x, 2)
    with torch.no_grad():
        first.attn.out_proj.weight.mul_(3.0)  # an earlier component's attention module
    assert not torch.allclose(levit.model.component_logits(x, 2), base)
    shift = torch.randn_like(first.token)  # not a constant: LayerNorm would remove it
    with torch.no_grad():
        first.attn.out_proj.weight.div_(3.0)
        first.token.add_(shift)  # an earlier component's token
    assert not torch.allclose(levit.model.component_logits(x, 2), base)
    with torch.no_grad():
        first.token.sub_(shift)
    torch.testing.assert_close(levit.model.component_logits(x, 2), base)
    # the gate is learned and part of what trains; the earlier components and the shared backbone are not
    trained = {id(p) for p in levit.parameters_to_train()}
    assert id(new.gate) in trained and trained == {id(p) for p in new.parameters()}
    assert not any(p.requires_grad for c in levit.components[:2] for p in c.parameters())
    assert not any(p.requires_grad for p in levit.model.shared.parameters())
    # a training step moves the new component (gate included) and nothing frozen
    before = {n: p.clone() for n, p in levit.model.state_dict().items()}
    batch = next(iter(engine.loader(engine.seq[1].train, 10, shuffle=True, seed=1)))
    levit.observe(hide_task(batch))
    after = levit.model.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert "components.2.gate" in moved and "components.2.attn.in_proj_weight" in moved
    assert not [n for n in moved if n.startswith(("components.0.", "components.1.", "shared."))], moved


def test_levit_shared_backbone_trains_until_the_first_expansion_only(tmp_path):
    engine = online_engine(tmp_path, levit_gamma=0.0)  # memory 20: the first check after 2 batches expands
    engine.setup()
    levit = engine.approach
    batches = [hide_task(b) for b in engine.loader(engine.seq[0].train, 10, shuffle=True, seed=0)]
    start = {n: p.clone() for n, p in levit.model.shared.state_dict().items()}
    levit.observe(batches[0])
    assert all(p.requires_grad for p in levit.model.shared.parameters())
    assert any(not torch.equal(p, start[n]) for n, p in levit.model.shared.state_dict().items())
    levit.observe(batches[1])
    assert len(levit.components) == 2
    assert not any(p.requires_grad for p in levit.model.shared.parameters())
    frozen = {n: p.clone() for n, p in levit.model.shared.state_dict().items()}
    levit.observe(batches[2])
    assert all(torch.equal(p, frozen[n]) for n, p in levit.model.shared.state_dict().items())


def test_levit_ablations_fixed_and_none(tmp_path):
    engine, fixed = levit_with(tmp_path, "fixed")
    x = pixels(engine, engine.seq[0].test)[:8]
    new = fixed.components[2]
    torch.testing.assert_close(new.gate_weights(), torch.full((3,), 1 / 3))
    with torch.no_grad():
        new.gate.copy_(torch.tensor([5.0, -5.0, 0.0]))  # the gate parameter is ignored: the weights stay even
    torch.testing.assert_close(new.gate_weights(), torch.full((3,), 1 / 3))
    assert id(new.gate) not in {id(p) for p in fixed.parameters_to_train()}
    # fixed still reuses the earlier modules
    base = fixed.model.component_logits(x, 2)
    with torch.no_grad():
        fixed.components[0].attn.out_proj.weight.mul_(3.0)
    assert not torch.allclose(fixed.model.component_logits(x, 2), base)
    # none (LEViT-No-DKF): the earlier components do not enter the new one's output
    engine, none = levit_with(tmp_path, "none")
    base = none.model.component_logits(x, 2)
    with torch.no_grad():
        none.components[0].attn.out_proj.weight.mul_(3.0)
        none.components[1].token.add_(torch.randn_like(none.components[1].token))
    torch.testing.assert_close(none.model.component_logits(x, 2), base)
    assert id(none.components[2].gate) not in {id(p) for p in none.parameters_to_train()}


def test_levit_learning_rate_is_its_own_by_default(tmp_path):
    engine = online_engine(tmp_path, levit_lr=1e-4)
    engine.setup()
    assert [g["lr"] for g in engine.approach.parameter_groups()] == [1e-4]
    assert engine.approach.stepper().optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    from mmcl.approaches.levit import LEViTOptions

    defaults = LEViTOptions()
    assert (defaults.levit_lr, defaults.levit_beta, defaults.levit_mlp_dim, defaults.levit_vae_hidden,
            defaults.levit_vae_layers, defaults.levit_novelty, defaults.levit_fusion) == \
        (1e-4, 0.5, 100, 200, 2, "latent", "dkf")  # the paper's


def test_levit_routes_each_input_to_the_component_with_the_lowest_vae_loss(tmp_path):
    engine = online_engine(tmp_path, levit_gamma=0.0)
    engine.setup()
    levit = engine.approach
    levit.model.add_component()
    for c in levit.components:
        c.steps += 1  # both count as trained (an untrained one is never routed to, tested below)
    batch = next(iter(engine.loader(engine.seq[0].test, 8, shuffle=False)))
    x = batch["pixel_values"]
    scores = levit.model.vae_scores(x)
    per_comp = [levit.model.component_logits(x, j) for j in range(len(levit.components))]
    out = levit.predict(hide_task(batch), None)
    assert set(scores.argmin(1).tolist()) == {0, 1}  # both components take some inputs here
    for i, j in enumerate(scores.argmin(1).tolist()):
        torch.testing.assert_close(out[i], per_comp[j][i])
    levit.components[1].steps.zero_()
    torch.testing.assert_close(levit.predict(hide_task(batch), None), per_comp[0])


def test_levit_resume_at_a_hidden_boundary_rebuilds_the_experts(tmp_path):
    kw = dict(num_tasks=3, n_train=40, levit_gamma=0.0, run_name="r")
    full = online_engine(tmp_path / "a", **kw)
    full.run()
    assert len(full.approach.components) > 2
    part = online_engine(tmp_path / "b", **kw)
    part.setup()
    part.rundir = RunDir.open(part.cfg, part.accelerator)
    # train the first two hidden segments and checkpoint, as an interrupted run would have
    for task in part.seq.tasks[:2]:
        part.train_stream(task)
        part.matrix.set_row(task.id, *part.evaluate_all())
        part.checkpoint(task.id)
    resumed = online_engine(tmp_path / "b", resume=str(part.run_dir), **kw)
    matrix = resumed.run()
    assert len(resumed.approach.components) == len(full.approach.components)
    assert resumed.approach.created_at == full.approach.created_at
    assert matrix.acc[-1] == pytest.approx(full.matrix.acc[-1], abs=1e-6)


@pytest.mark.parametrize("baseline", ["online_finetune", "online_replay", "mir", "levit"])
def test_online_learners_run_and_learn(tmp_path, baseline):
    # LEViT's expert trains until its memory is full: a memory of one toy task
    extra = {"memory_size": 60, "levit_gamma": 0.0, "online_iters": 8, "learning_rate": 1e-2} if baseline == "levit" else {}
    engine = online_engine(tmp_path, baseline, num_tasks=2, n_train=60, **{"online_iters": 2, **extra})
    matrix = engine.run()
    assert matrix.acc[0][0] > 60  # two toy classes, after one pass
    if baseline in ("online_replay", "mir"):
        assert len(engine.approach.memory) == 20 and int(engine.approach.memory.seen) == 120


def test_mir_picks_the_most_interfered_candidates(tmp_path):
    engine = online_engine(tmp_path, "mir", replay_batch_size=3, mir_candidates=20)
    engine.setup()
    mir = engine.approach
    for b in engine.loader(engine.seq[0].train, 10, shuffle=False):
        mir.memory.add(b["pixel_values"], b["labels"])
    batch = next(iter(engine.loader(engine.seq[1].train, 10, shuffle=False)))
    x, y = mir.replay(batch["pixel_values"], batch["labels"])
    assert len(y) == 3
    # recompute the interference of every candidate by a real SGD step on a copy
    import copy

    mir.memory.draws -= 1  # the candidates replay drew (each draw advances the generator)
    cx, cy = mir.memory.sample(20)
    twin = copy.deepcopy(mir.model)
    loss = torch.nn.functional.cross_entropy(twin({"pixel_values": batch["pixel_values"]}), batch["labels"])
    loss.backward()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(mir.model({"pixel_values": cx}), cy, reduction="none")
        for p in twin.parameters():
            if p.grad is not None:
                p -= mir.cfg.mir_virtual_lr * p.grad
        after = torch.nn.functional.cross_entropy(twin({"pixel_values": cx}), cy, reduction="none")
    top = set((after - before).topk(3).indices.tolist())
    chosen = {i for i in range(20) for j in range(3) if torch.equal(cx[i], x[j]) and cy[i] == y[j]}
    assert chosen == top


def test_online_flags_are_validated(tmp_path):
    with pytest.raises(ValueError, match="--online_batch_size must be > 0"):
        online_engine(tmp_path, online_batch_size=0).setup()
    with pytest.raises(ValueError, match="--levit_gamma must be >= 0"):
        online_engine(tmp_path, levit_gamma=-1.0).setup()
    with pytest.raises(ValueError, match="--baseline levit needs --memory_size > 0"):
        online_engine(tmp_path, memory_size=0).setup()
    with pytest.raises(ValueError, match="--levit_fusion must be one of dkf, fixed, none, output"):
        online_engine(tmp_path, levit_fusion="gated").setup()
    with pytest.raises(ValueError, match="--levit_novelty must be one of latent, elbo"):
        online_engine(tmp_path, levit_novelty="kl").setup()


def test_levit_export_and_from_pretrained_give_the_same_predictions(tmp_path):
    from mmcl.hub import export_run, from_pretrained

    engine = online_engine(tmp_path, num_tasks=2, n_train=40, levit_gamma=0.0, run_name="x")
    engine.run()
    assert len(engine.approach.components) > 1
    model = from_pretrained(export_run(engine.run_dir))
    assert len(model.components) == len(engine.approach.components)
    batch = hide_task(next(iter(engine.loader(engine.seq[1].test, 32, shuffle=False))))
    engine.approach.eval()
    assert torch.equal(model.predict(batch, None), engine.approach.predict(batch, None))


def test_levit_cpu_preset_sets_only_the_learning_rate():
    from mmcl.flags import build_config

    cfg = build_config({"task": "split_digits", "baseline": "levit", "scenario": "online", "preset": "levit_cpu"})
    paper = build_config({"task": "split_digits", "baseline": "levit", "scenario": "online"})
    assert cfg.options["levit_lr"] == pytest.approx(1e-3) and paper.options["levit_lr"] == pytest.approx(1e-4)
    assert {k: v for k, v in cfg.options.items() if k != "levit_lr"} == \
        {k: v for k, v in paper.options.items() if k != "levit_lr"}
    with pytest.raises(ValueError, match="levit_cpu is a setting of --baseline levit"):
        build_config({"task": "split_digits", "baseline": "mir", "scenario": "online", "preset": "levit_cpu"})
