import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = Path(os.environ.get("MMCL_DATA", ROOT.parent / "shared" / "data"))


def synthetic_image_sequence(num_tasks: int = 2, classes_per_task: int = 2, n_train: int = 64, n_test: int = 32,
                             size: int = 8, seed: int = 0, noise: float = 40.0):
    """Learnable toy images: class c lights up its own pixel block; tasks have disjoint classes."""
    from datasets import Dataset

    from mmcl.data.sequence import Task, TaskSequence

    rng = np.random.default_rng(seed)
    total = num_tasks * classes_per_task
    block = max(1, size * size // total)

    def make(n, global_classes):
        labels = rng.integers(0, len(global_classes), n)
        images = rng.normal(60, noise, (n, size, size))
        flat = images.reshape(n, -1)
        for i, y in enumerate(labels):
            c = global_classes[y]
            flat[i, c * block:(c + 1) * block] += 150
        return Dataset.from_dict({"image": np.clip(images, 0, 255).astype(np.uint8), "label": labels.astype(int)})

    tasks = []
    for t in range(num_tasks):
        classes = list(range(t * classes_per_task, (t + 1) * classes_per_task))
        tasks.append(Task(t, f"toy{t}", "image", [f"c{c}" for c in classes],
                          make(n_train, classes), make(n_test, classes), make(n_test, classes)))
    return TaskSequence("toy", tasks)


NOUNS = ["phone", "screen", "movie", "meal", "battery", "camera", "hotel", "book"]
ADJECTIVES = ["red", "new", "old", "big", "small", "blue"]


def toy_text_sequence(n_train: int = 48, n_test: int = 24):
    """Two learnable binary tasks: 'contains good' and 'contains not'."""
    from datasets import Dataset

    from mmcl.data.sequence import Task, TaskSequence

    def make(rule, n, seed):
        rng = random.Random(seed)
        texts, labels = [], []
        for i in range(n):
            noun, adj, y = rng.choice(NOUNS), rng.choice(ADJECTIVES), i % 2
            if rule == "good":
                texts.append(f"the {noun} is {'good' if y else adj}")
            else:  # lengths vary by a token between the classes and, via 'really', within them
                texts.append(f"the {noun} is {'not ' if y else ''}{'really ' * (i % 3 == 0)}{adj}")
            labels.append(y)
        return Dataset.from_dict({"text": texts, "label": labels})

    tasks = [Task(t, rule, "text", ["no", "yes"], make(rule, n_train, t), make(rule, n_test, 10 + t),
                  make(rule, n_test, 20 + t)) for t, rule in enumerate(["good", "not"])]
    return TaskSequence("toytext", tasks)


def col(ds, name: str) -> list:
    """A column as a plain list (datasets>=4 returns a lazy Column)."""
    return list(ds[name])


def tiny_config(tmp_path, **overrides):
    from mmcl.config import RunConfig

    values = dict(task="toy", backbone="vit", baseline="finetune", scenario="til", num_train_epochs=2,
                  learning_rate=3e-3, train_batch_size=16, eval_batch_size=64, vit_embed_dim=32, vit_depth=1,
                  vit_heads=2, patch_size=4, output_dir=str(tmp_path / "runs"), progress=False, memory_size=20)
    values.update(overrides)
    return RunConfig.from_dict(values)


@pytest.fixture
def toy_sequence():
    return synthetic_image_sequence


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A randomly initialised 2-layer BERT (width 16) with MiniLM's tokenizer, as a local model folder: runs
    every text code path of a BERT-family encoder in a fraction of MiniLM's time."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mmcl.backbones.text import resolve_bert_model

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_bert_model(None))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
