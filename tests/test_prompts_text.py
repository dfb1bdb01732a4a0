"""Prompt methods on text encoders (bert_frozen / MiniLM) and on `dual` (a prompt pool per modality)."""
import pytest
import torch

from conftest import tiny_config, toy_text_sequence

from mmcl.engine import Engine
from mmcl.rundir import RunDir

TEXT_PROMPT_FLAGS = dict(task="toytext", backbone="bert_frozen", scenario="cil", max_seq_length=16,
                         coda_layers="0-1", coda_pool_size=10, coda_length=4, l2p_pool_size=6, l2p_length=2,
                         l2p_top_k=3, dualprompt_g_layers="0", dualprompt_e_layers="1-2", dualprompt_g_length=2,
                         dualprompt_e_length=3, num_train_epochs=1, save_checkpoints=False, learning_rate=1e-2,
                         weight_decay=0.05)


@pytest.fixture(scope="module")
def minilm():
    from mmcl.backbones.text import BertEncoder

    return BertEncoder(None, 32, "mean", trainable=False).eval()


def encode(encoder, texts):
    return encoder.collate_inputs([dict(encoder.tokenizer(t)) for t in texts])


def test_text_token_path_is_the_transformers_forward_and_padding_never_counts(minilm):
    texts = ["what is the capital of france ?", "who wrote hamlet", "why"]
    batch = encode(minilm, texts)
    kwargs = {k: batch[k] for k in minilm.input_keys if k in batch}
    with torch.no_grad():
        reference = minilm.encoder(**kwargs).last_hidden_state
        tokens, mask = minilm.encode_tokens(batch)
        real = batch["attention_mask"].bool()
        assert torch.allclose(tokens[real], reference[real], atol=1e-5)
        assert torch.allclose(minilm.pool_tokens(tokens, mask), minilm(batch), atol=1e-6)
        D, n = minilm.token_dim, len(texts)
        gen = torch.Generator().manual_seed(0)
        prefix = (torch.randn(1, 4, D, generator=gen), torch.randn(1, 4, D, generator=gen))
        insert = torch.randn(1, 3, D, generator=gen)
        prefixed = minilm.pool_tokens(*minilm.encode_tokens(batch, {2: tuple(p.expand(n, -1, -1) for p in prefix)}))
        inserted, inserted_mask = minilm.encode_tokens(batch, insert=insert.expand(n, -1, -1))
        assert not torch.allclose(prefixed, minilm(batch), atol=1e-3)
        # inserted tokens sit right after [CLS] and are never masked
        assert inserted.shape[1] == tokens.shape[1] + 3 and inserted_mask[:, 1:4].all()
        assert torch.equal(inserted_mask[:, 4:], mask[:, 1:])
        # the shortest sentence alone (no padding) gives what it gives padded in the batch: padding is masked,
        # and prefix / inserted positions are visible to it in both
        alone = encode(minilm, texts[-1:])
        assert torch.allclose(minilm.pool_tokens(*minilm.encode_tokens(alone, {2: prefix})), prefixed[-1:], atol=1e-5)
        alone_inserted, _ = minilm.encode_tokens(alone, insert=insert)
        assert torch.allclose(alone_inserted[0, 1:4], inserted[-1, 1:4], atol=1e-5)


@pytest.mark.parametrize("baseline", ["coda_prompt", "l2p", "dualprompt"])
def test_prompt_methods_on_bert_frozen_keep_the_encoder_bit_identical(tmp_path, baseline):
    cfg = tiny_config(tmp_path, baseline=baseline, **TEXT_PROMPT_FLAGS)
    engine = Engine(cfg, sequence=toy_text_sequence(n_train=16, n_test=8))
    engine.setup()
    a = engine.approach
    assert set(a.pools) == {"text"} and a.encoders["text"] is a.model.backbone
    start = {k: v.clone() for k, v in a.model.backbone.state_dict().items()}
    prompts = {n: p.detach().clone() for n, p in a.named_parameters() if n.startswith("pools.")}
    engine.rundir = RunDir.open(engine.cfg, engine.accelerator)
    for task in engine.seq:
        engine.train_task(task)
    end = a.model.backbone.state_dict()
    assert all(torch.equal(start[k], end[k]) for k in start)
    assert any(not torch.equal(p, prompts[n]) for n, p in a.named_parameters() if n in prompts)
    assert not {id(p) for p in a.model.backbone.parameters()} & {id(p) for p in a.parameters_to_train()}
    batch = engine.collate([engine.seq[1].test[i] for i in range(8)])
    logits = a.eval().predict({k: v.to(a.device) if torch.is_tensor(v) else v for k, v in batch.items()}, None)
    assert logits.shape == (8, 4) and torch.isfinite(logits).all()


def test_prompt_pool_per_modality_on_dual(tmp_path):
    from test_multimodal import mixed_sequence

    cfg = tiny_config(tmp_path, task="toymixed", backbone="dual", baseline="l2p", scenario="cil",
                      text_backbone="bert_frozen", max_seq_length=16, dual_dim=24, l2p_pool_size=4, l2p_length=2,
                      l2p_top_k=2, num_train_epochs=1, save_checkpoints=False, learning_rate=1e-2)
    engine = Engine(cfg, sequence=mixed_sequence(n_train=16, n_test=8))
    engine.setup()
    a = engine.approach
    assert set(a.pools) == {"text", "image"}
    assert a.pools["text"].prompts.shape[-1] == 384 and a.pools["image"].prompts.shape[-1] == 32
    with pytest.raises(ValueError, match="one prompt pool per modality"):
        a.pool
    engine.rundir = RunDir.open(engine.cfg, engine.accelerator)
    backbone = {k: v.clone() for k, v in a.model.backbone.state_dict().items()}
    engine.train_task(engine.seq[0])  # text
    text_pool = a.pools["text"].prompts.detach().clone()
    image_pool = a.pools["image"].prompts.detach().clone()
    engine.train_task(engine.seq[1])  # images: only the image pool learns
    assert torch.equal(a.pools["text"].prompts, text_pool)
    assert not torch.equal(a.pools["image"].prompts, image_pool)
    assert all(torch.equal(v, a.model.backbone.state_dict()[k]) for k, v in backbone.items())


def test_prompt_methods_name_the_tower_flag_on_dual(tmp_path):
    from test_multimodal import mixed_sequence

    cfg = tiny_config(tmp_path, task="toymixed", backbone="dual", baseline="coda_prompt", scenario="cil",
                      text_backbone="bert_frozen", vision_backbone="convit", max_seq_length=16,
                      num_train_epochs=1, save_checkpoints=False)
    engine = Engine(cfg, sequence=mixed_sequence(n_train=8, n_test=4))
    with pytest.raises(ValueError, match="--vision_backbone: prompts go inside self-attention"):
        engine.setup()


def test_prompt_layers_beyond_the_text_encoders_depth_name_the_flag(tmp_path):
    cfg = tiny_config(tmp_path, baseline="coda_prompt", **{**TEXT_PROMPT_FLAGS, "coda_layers": "0-7"})
    engine = Engine(cfg, sequence=toy_text_sequence(n_train=8, n_test=4))
    with pytest.raises(ValueError, match="--coda_layers: layers \\[6, 7\\] do not exist; the encoder has 6 layers"):
        engine.setup()
