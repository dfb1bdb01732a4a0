"""bf16 autocast on the CPU (fp16 on CUDA): every approach trains and evaluates under it."""
import numpy as np
import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config
from mmcl.approaches import APPROACHES
from mmcl.engine import Engine
from test_hat_ctr import toy_text_sequence

TEXT_ONLY = {"hat", "ctr"}
IMAGE = ["finetune", "joint", "one", "replay", "ewc", "lwf", "dytox"]
ONLINE = ["online_finetune", "online_replay", "mir", "levit"]  # --scenario online
# frozen random backbone: two blocks so that DualPrompt's G- and E-prompts get one each; longer training
PROMPT = {"coda_prompt": {"coda_layers": "0-1", "coda_pool_size": 10},
          "l2p": {"learning_rate": 3e-3}, "dualprompt": {"dualprompt_g_layers": "0", "dualprompt_e_layers": "1"}}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is per process: reset it so that this file's bf16 and the others' fp32 coexist."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_every_registered_approach_is_covered():
    assert set(APPROACHES.names()) <= set(IMAGE) | TEXT_ONLY | set(ONLINE) | set(PROMPT), "add new approaches to this file's bf16 runs"


@pytest.mark.parametrize("baseline", ONLINE)
def test_bf16_online_stream_completes_and_learns(tmp_path, baseline):
    extra = dict(memory_size=60, levit_gamma=0.0, online_iters=8, learning_rate=1e-2, levit_embed_dim=16,
                 levit_heads=2, levit_mlp_dim=16, levit_latent_dim=4, levit_vae_hidden=16) if baseline == "levit" else {}
    cfg = tiny_config(tmp_path, baseline=baseline, scenario="online", mixed_precision="bf16", save_checkpoints=False,
                      **{"online_iters": 2, **extra})
    seq = synthetic_image_sequence(n_train=60)
    engine = Engine(cfg, sequence=seq)
    matrix = engine.run()
    assert np.isfinite(matrix.acc).all()
    assert matrix.acc[0][0] >= 60, matrix.acc
    batch = next(iter(engine.loader(seq[0].test, 8, shuffle=False)))
    with engine.accelerator.autocast():
        assert engine.approach.predict(batch, None).dtype == torch.bfloat16


@pytest.mark.parametrize("baseline", IMAGE + sorted(TEXT_ONLY) + sorted(PROMPT))
def test_bf16_run_completes_and_learns(tmp_path, baseline):
    if baseline in TEXT_ONLY:
        cfg = tiny_config(tmp_path, task="toytext", backbone="bert_adapter", baseline=baseline, bert_adapter_size=8,
                          max_seq_length=32, num_train_epochs=3, learning_rate=5e-3, mixed_precision="bf16",
                          save_checkpoints=False)
        seq = toy_text_sequence()
    elif baseline in PROMPT:
        cfg = tiny_config(tmp_path, baseline=baseline, mixed_precision="bf16", save_checkpoints=False, vit_depth=2,
                          num_train_epochs=12, **{"learning_rate": 1e-2, **PROMPT[baseline]})
        seq = synthetic_image_sequence()
    else:
        cfg = tiny_config(tmp_path, baseline=baseline, mixed_precision="bf16", save_checkpoints=False,
                          backbone="convit" if baseline == "dytox" else "vit")
        seq = synthetic_image_sequence()
    engine = Engine(cfg, sequence=seq)
    matrix = engine.run()
    assert engine.accelerator.mixed_precision == "bf16"
    assert np.isfinite(matrix.acc).all() and np.isfinite(matrix.f1).all()
    # a frozen random backbone (prompt methods) learns the toy tasks less well; chance is 50
    assert np.diag(matrix.acc).min() >= (60 if baseline in PROMPT else 75), matrix.acc
    batch = next(iter(engine.loader(seq[0].test, 8, shuffle=False)))
    with engine.accelerator.autocast():
        assert engine.approach.predict(batch, 0).dtype == torch.bfloat16  # the matmuls did run in bf16
