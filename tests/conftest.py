"""Shared fixtures: small random GPT-2 checkpoints in Hugging Face format, and the real data."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def save_random_hf_gpt2(path, n_layer=2, n_head=4, n_embd=64, n_positions=256, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=50257)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_gpt2_dir(tmp_path_factory):
    """A 2-layer, 4-head, 64-dim random GPT-2 saved with save_pretrained."""
    path = tmp_path_factory.mktemp("hf_gpt2")
    save_random_hf_gpt2(path)
    return path


@pytest.fixture(scope="session")
def data_dir():
    """The real Rotten Tomatoes splits as local JSONL; CI sets ROTTEN_TOMATOES_DIR."""
    path = os.environ.get("ROTTEN_TOMATOES_DIR")
    if not path:
        pytest.fail("ROTTEN_TOMATOES_DIR is not set: point it at the local rotten_tomatoes copy")
    return Path(path)


@pytest.fixture(scope="session")
def small_data_dir(data_dir, tmp_path_factory):
    """A balanced slice of the real splits: 300 train, 64 validation, 64 test reviews."""
    path = tmp_path_factory.mktemp("rt_small")
    for split, half in (("train", 150), ("validation", 32), ("test", 32)):
        lines = (data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        (path / f"{split}.jsonl").write_text("\n".join(lines[:half] + lines[-half:]) + "\n", encoding="utf-8")
    return path


def run_train(*flags):
    """train.py in this process, tiny and quick unless flags say otherwise."""
    import train
    train.main(["device=cpu", "eval_test=false", "batch_size=8", "gradient_accumulation_steps=2",
                "eval_interval=2", "eval_batch_size=32", *map(str, flags)])
