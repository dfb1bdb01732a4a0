"""bf16 autocast on the CPU (fp16 on CUDA): every approach trains and evaluates under it."""
import numpy as np
import pytest
import torch

from conftest import synthetic_image_sequence, tiny_config, toy_text_sequence
from mmcl.approaches import APPROACHES
from mmcl.engine import Engine

# Every registered approach gets a bf16 run, chosen by what it declares (scenarios, modalities); a new
# approach is covered without editing this file. Sizes for the ones that need them on these toy tasks:
# a frozen random backbone (prompt methods) with two blocks, so that DualPrompt's G- and E-prompts get one
# each, and longer training; LEViT with small experts.
SETTINGS = {
    "dytox": {"backbone": "convit"},
    "coda_prompt": {"coda_layers": "0-1", "coda_pool_size": 10},
    "l2p": {"learning_rate": 3e-3},
    "dualprompt": {"dualprompt_g_layers": "0", "dualprompt_e_layers": "1"},
    "levit": dict(memory_size=60, levit_gamma=0.0, online_iters=8, learning_rate=1e-2, levit_embed_dim=16,
                  levit_heads=2, levit_mlp_dim=16, levit_latent_dim=4, levit_vae_hidden=16, levit_lr=None),
}


def registered(kind: str) -> list[str]:
    from mmcl.approaches.prompting import PromptApproach

    out = []
    for name in APPROACHES.names():
        cls = APPROACHES.get(name)
        # the adapter-site methods (HAT, CTR) run here on bert_adapter; HAT on vit_adapter is in test_hat_ctr.py
        text = cls.modalities == ("text",) or bool(getattr(cls, "adapter_backbones", ()))
        k = ("online" if "online" in cls.scenarios else "text" if text
             else "prompt" if issubclass(cls, PromptApproach) else "image")
        if k == kind:
            out.append(name)
    return out


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate's state is per process: reset it so that this file's bf16 and the others' fp32 coexist."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("baseline", registered("online"))
def test_bf16_online_stream_completes_and_learns(tmp_path, baseline):
    cfg = tiny_config(tmp_path, baseline=baseline, scenario="online", mixed_precision="bf16", save_checkpoints=False,
                      **{"online_iters": 2, **SETTINGS.get(baseline, {})})
    seq = synthetic_image_sequence(n_train=60)
    engine = Engine(cfg, sequence=seq)
    matrix = engine.run()
    assert np.isfinite(matrix.acc).all()
    assert matrix.acc[0][0] >= 60, matrix.acc
    batch = next(iter(engine.loader(seq[0].test, 8, shuffle=False)))
    with engine.accelerator.autocast():
        assert engine.approach.predict(batch, None).dtype == torch.bfloat16


@pytest.mark.parametrize("baseline", registered("image") + registered("text") + registered("prompt"))
def test_bf16_run_completes_and_learns(tmp_path, baseline):
    prompt = baseline in registered("prompt")
    if baseline in registered("text"):
        cfg = tiny_config(tmp_path, task="toytext", backbone="bert_adapter", baseline=baseline, bert_adapter_size=8,
                          max_seq_length=32, num_train_epochs=3, learning_rate=5e-3, mixed_precision="bf16",
                          save_checkpoints=False)
        seq = toy_text_sequence()
    elif prompt:
        cfg = tiny_config(tmp_path, baseline=baseline, mixed_precision="bf16", save_checkpoints=False, vit_depth=2,
                          num_train_epochs=12, **{"learning_rate": 1e-2, **SETTINGS.get(baseline, {})})
        seq = synthetic_image_sequence()
    else:
        cfg = tiny_config(tmp_path, baseline=baseline, mixed_precision="bf16", save_checkpoints=False,
                          **SETTINGS.get(baseline, {}))
        seq = synthetic_image_sequence()
    engine = Engine(cfg, sequence=seq)
    matrix = engine.run()
    assert engine.accelerator.mixed_precision == "bf16"
    assert np.isfinite(matrix.acc).all() and np.isfinite(matrix.f1).all()
    # a frozen random backbone (prompt methods) learns the toy tasks less well; chance is 50
    assert np.diag(matrix.acc).min() >= (60 if prompt else 75), matrix.acc
    batch = next(iter(engine.loader(seq[0].test, 8, shuffle=False)))
    with engine.accelerator.autocast():
        assert engine.approach.predict(batch, 0).dtype == torch.bfloat16  # the matmuls did run in bf16
