"""Shared fixtures: small random GPT-2 checkpoints in Hugging Face format, the real data, and tiny runs."""
import hashlib
import json
import os
import socket
import sys
import tempfile
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


CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-gpt2-tests"
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
WAYS_OUT = ("connect to the internet once (both are then kept in {cache}), or set ROTTEN_TOMATOES_DIR to a "
            'directory with train.jsonl, validation.jsonl and test.jsonl (one '
            '{{"text": ..., "label": 0 or 1}} object a line) and TIKTOKEN_CACHE_DIR to one with '
            "GPT-2's vocab.bpe and encoder.json under tiktoken's cache names (README.md, Tests)")


def reachable(host):
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def fetch_test_data():
    """The splits and the tokenizer files the tests need: from ROTTEN_TOMATOES_DIR and TIKTOKEN_CACHE_DIR
    where set; else downloaded once through the project's own loaders into CACHE. None, or what is missing."""
    from dataloader import SPLITS, DataError, get_tokenizer, load_rotten_tomatoes
    from harness.checkpoints import hub_reachable
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(CACHE / "tiktoken"))
    cached = [Path(os.environ["TIKTOKEN_CACHE_DIR"]) / hashlib.sha1(f"{BPE_URL}{name}".encode()).hexdigest()
              for name in ("vocab.bpe", "encoder.json")]
    if not all(p.exists() for p in cached) and not reachable("openaipublic.blob.core.windows.net"):
        return (f"no GPT-2 tokenizer files in TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']} "
                "and no internet")
    try:
        get_tokenizer()
    except DataError as e:
        return str(e)
    if "ROTTEN_TOMATOES_DIR" in os.environ and not Path(os.environ["ROTTEN_TOMATOES_DIR"]).is_dir():
        return f"ROTTEN_TOMATOES_DIR={os.environ['ROTTEN_TOMATOES_DIR']} is not a directory"
    if "ROTTEN_TOMATOES_DIR" not in os.environ:
        os.environ["ROTTEN_TOMATOES_DIR"] = str(CACHE / "rotten_tomatoes")
        if not (CACHE / "rotten_tomatoes").is_dir():
            if not hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
                return "ROTTEN_TOMATOES_DIR is not set and the Hugging Face hub cannot be reached"
            splits = load_rotten_tomatoes("rotten_tomatoes")
            CACHE.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=CACHE))
            for split in SPLITS:
                (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits[split]),
                                                    encoding="utf-8")
            os.replace(tmp, CACHE / "rotten_tomatoes")
    return None


@pytest.fixture(scope="session", autouse=True)
def test_data():
    missing = fetch_test_data()
    if missing:
        pytest.exit(f"{missing}: {WAYS_OUT.format(cache=CACHE)}", returncode=3)


@pytest.fixture(scope="session")
def data_dir(test_data):
    """The real Rotten Tomatoes splits as local JSONL."""
    return Path(os.environ["ROTTEN_TOMATOES_DIR"])


@pytest.fixture(scope="session")
def small_data_dir(data_dir, tmp_path_factory):
    """A balanced slice of the real splits: 300 train, 64 validation, 64 test reviews."""
    path = tmp_path_factory.mktemp("rt_small")
    for split, half in (("train", 150), ("validation", 32), ("test", 32)):
        lines = (data_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        (path / f"{split}.jsonl").write_text("\n".join(lines[:half] + lines[-half:]) + "\n", encoding="utf-8")
    return path


@torch.no_grad()
def greedy_one_at_a_time(model, prompt, max_new_tokens):
    """nanoGPT's generation loop, the reference for batched generation: the whole sequence is run
    again for each new token, with no cache, no padding and no shared start."""
    idx = torch.tensor([prompt])
    for _ in range(max_new_tokens):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return idx[0, len(prompt):].tolist()


def checkpoint_of(model, base=None):
    """A checkpoint dict of model's trained tensors, as train.py writes ckpt.pt."""
    from harness.checkpoints import checkpoint_of as of
    return of(model, base, run_id="test", iter_num=0, best_val_loss=0.0, config={})


def last_wins(*flags, names=None):
    """key=value flags with the last value of each flag kept (train.py refuses a flag given twice)."""
    from harness.flags import UsageError, canonical

    def name(flag):
        key = str(flag).partition("=")[0]
        try:
            return canonical(key, names) if names else key
        except UsageError:  # an unknown flag passes through, to be refused
            return key
    return list({name(f): str(f) for f in flags}.values())


def run_train(*flags):
    """train.py in this process, tiny and quick unless flags say otherwise (a resumed run keeps its own
    step)."""
    import train
    step = [] if "init_from=resume" in flags else ["batch_size=8", "gradient_accumulation_steps=2"]
    train.main(last_wins("device=cpu", "eval_test=false", *step, "eval_interval=2", "eval_batch_size=32",
                         *flags, names=train.FLAGS))


# a killed run, and the uninterrupted run it must equal once resumed
KILLER = r"""
import os, signal, sys
import harness.checkpoints as checkpoints, train
target, nth = sys.argv[1], int(sys.argv[2])
calls = [0]
def wrap(original):
    def wrapped(*args, **kwargs):
        if target == "atomic_write" and not str(args[0]).endswith(".pt"):
            return original(*args, **kwargs)  # checkpoints are counted, not metrics or results
        calls[0] += 1
        if calls[0] == nth:
            if target == "atomic_write":  # die with the temporary file half written
                path, write = args
                def half(f):
                    write(f)
                    f.flush()
                    f.truncate(f.tell() // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(path, half)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapped
if target == "atomic_write":
    checkpoints.atomic_write = wrap(checkpoints.atomic_write)
else:
    train.validation_loss = wrap(train.validation_loss)
train.main(sys.argv[3:])
"""


def tiny_run_flags(hf_dir, data_dir, out_dir):
    return [f"init_from={hf_dir}", f"dataset={data_dir}", f"out_dir={out_dir}", "max_iters=4",
            "eval_interval=2", "rank=8", "alpha=32", "lr=1e-2", "lora_dropout=0.1", "dropout=0.1",
            "batch_size=8", "gradient_accumulation_steps=1", "eval_batch_size=32", "eval_test=false",
            "device=cpu", "resume=auto"]


def losses(out_dir):
    rows = [json.loads(l)
            for l in (out_dir / "metrics.jsonl").read_text().splitlines()[1:]]  # after the run's id
    return [{k: r[k] for k in ("iter", "train_loss", "val_loss") if k in r} for r in rows]


@pytest.fixture(scope="session")
def straight_run(hf_gpt2_dir, small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1])
    return out


def files(out_dir):
    return {p.name: p.read_bytes() for p in out_dir.iterdir()}


@pytest.fixture
def finished_run(hf_gpt2_dir, small_data_dir, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1])
    return out, files(out)
