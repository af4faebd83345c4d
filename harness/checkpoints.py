"""Checkpoint files, written whole and loaded without pickled code, and the GPT-2 weights they apply to.

A checkpoint has nanoGPT's keys and the run's id; its model part holds only the parameters that train,
and where the rest is frozen (LoRA), base names those weights: their init_from and a CRC-32 of each.
"""
import contextlib
import difflib
import functools
import hashlib
import json
import os
import pickle
import socket
import tempfile
import urllib.parse
import zlib
from dataclasses import asdict

import torch

from harness.flags import TRUE, UsageError
from finetune import METHOD_SETTINGS, apply_method
from model import GPT, GPTConfig

VERSION = 3
KEYS = {"version", "run_id", "model", "model_args", "base", "iter_num", "best_val_loss", "config"}
BASE_KEYS = ("init_from", "fingerprint")
CONFIG_KEYS = {"init_from", "dataset", "prompt_template", "max_iters", "eval_batch_size"}  # read back
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
FORM = {  # each part of a checkpoint as train.py writes it (ckpt_last.pt's resume state too)
    "run_id": lambda v: isinstance(v, str), "iter_num": lambda v: type(v) is int,
    "best_val_loss": lambda v: isinstance(v, (int, float)), "model_args": lambda v: isinstance(v, dict),
    "model": lambda v: isinstance(v, dict) and all(map(torch.is_tensor, v.values())),
    "config": lambda v: isinstance(v, dict) and CONFIG_KEYS <= set(v),
    "base": lambda v: v is None or isinstance(v, dict) and all(type(v.get(k)) is str for k in BASE_KEYS),
    "optimizer": lambda v: isinstance(v, dict) and {"state", "param_groups"} <= set(v),
    "scaler": lambda v: isinstance(v, dict),
    "rng": lambda v: isinstance(v, list) and len(v) > 0 and all(
        isinstance(r, dict) and torch.is_tensor(r.get("cpu")) and "cuda" in r for r in v),
}
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: files get the usual permissions, not mkstemp's owner-only ones


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used; the message says why."""


def atomic_write(path, write):
    """Write path through a new temporary file renamed into place: a kill or a full disk never tears it."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            os.remove(tmp)
        cause = e  # torch.save reports a failed write as a RuntimeError caused by the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise OSError(f"could not write {path} ({cause.strerror or cause}); the previous file, if any, "
                      "is intact") from None


def read_json(path):
    """path's JSON, or None where it is missing or damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_of(model, base, **entries):
    """A checkpoint of model's parameters that train (a tied embedding once)."""
    trained = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    return dict(version=VERSION, model=trained, model_args=asdict(model.config), base=base, **entries)


def base_fingerprint(model):
    """The frozen weights' identity: each one's name, shape and CRC-32 (gpt2-medium: 0.3 s; sha256 1.2 s)."""
    if any(getattr(m, "has_weights_merged", False) for m in model.modules()):
        raise RuntimeError("the base weights have LoRA merged into them; call model.train() first")
    digest = hashlib.sha256()
    for name, t in model.named_parameters():
        if not t.requires_grad:
            crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy())
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}{crc}".encode())
    return digest.hexdigest()[:16]


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, mmap=False):
    """A checkpoint of this project: tensors and plain data only (with mmap, mapped and read where used)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):
            raise CheckpointError(f"{path} needs pickled code to load; refused (only tensors and plain data "
                                  "are loaded, for safety)") from None
        text = str(e).split("WeightsUnpickler error:")[-1]  # not PyTorch's advice to load it unsafely
        reason = (text.strip().splitlines() or [type(e).__name__])[0]
        reason = "an empty file" if os.path.getsize(path) == 0 else reason
        raise CheckpointError(f"{path} is corrupt or truncated ({reason})") from None
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    if checkpoint.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('version')!r}; this code reads "
                              f"format {VERSION}")
    if not KEYS <= set(checkpoint):
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(sorted(KEYS - set(checkpoint)))}")
    damaged = [part for part, form in FORM.items() if part in checkpoint and not form(checkpoint[part])]
    if damaged:
        raise CheckpointError(f"{path} is damaged: its {damaged[0]} is not what train.py writes")
    return checkpoint


def model_config(checkpoint):
    """The GPTConfig a checkpoint's model_args describe (settings it predates at their defaults), refused
    where they are inconsistent or its tensors are not that model's."""
    try:
        config = GPTConfig(**checkpoint["model_args"])
    except TypeError as e:
        raise CheckpointError(f"the checkpoint's model_args are not this model's settings ({e})") from None
    every_weight = config.method == "lora" and config.lora_rank == 0  # full fine-tuning: no base
    if (config.n_head <= 0 or config.n_embd % config.n_head or config.method not in METHOD_SETTINGS
            or every_weight != (checkpoint["base"] is None)):
        raise CheckpointError(f"the checkpoint's model_args are inconsistent: {checkpoint['model_args']}")
    with torch.device("meta"):  # its shapes, allocating nothing: model_args may be damaged
        check_tensors(apply_method(GPT(config)), checkpoint)
    return config


def load_model(checkpoint, base=None):
    """The model a checkpoint describes: its trained tensors on the base weights it trained on (at base)."""
    config = model_config(checkpoint)
    if checkpoint["base"] is None:
        return load_trained(apply_method(GPT.uninitialized(config)), checkpoint)
    base = base or checkpoint["base"]["init_from"]
    with loading_weights("base", base):
        model = apply_method(GPT.from_pretrained(base, {k: getattr(config, k) for k in GPT.ADAPTABLE}))
    differs = next((k for k, v in asdict(model.config).items() if getattr(config, k) != v), None)
    if differs:
        saved, found = getattr(config, differs), getattr(model.config, differs)
        raise CheckpointError(f"the checkpoint's model_args have {differs}={saved!r}, its base model "
                              f"{differs}={found!r}")
    if base_fingerprint(model) != checkpoint["base"]["fingerprint"]:
        raise CheckpointError(f"the adapter was trained on {checkpoint['base']['init_from']} (weights "
                              f"{checkpoint['base']['fingerprint']}), not on {base} (weights "
                              f"{base_fingerprint(model)}); give the base it was trained on")
    return load_trained(model, checkpoint)


def load_trained(model, checkpoint):
    """Copy a checkpoint's trained tensors into model, a model of its run (LoRA unmerged first)."""
    model.train()
    check_tensors(model, checkpoint)
    model.load_state_dict(checkpoint["model"], strict=False)
    return model


def check_tensors(model, checkpoint):
    expected, state = {n: p for n, p in model.named_parameters() if p.requires_grad}, checkpoint["model"]
    if set(state) != set(expected):
        unexpected, missing = len(set(state) - set(expected)), len(set(expected) - set(state))
        raise CheckpointError(f"the checkpoint's tensors do not match the model: {unexpected} unexpected, "
                              f"{missing} missing")
    wrong = next((name for name, t in state.items() if t.shape != expected[name].shape), None)
    if wrong:
        raise CheckpointError(f"the checkpoint's {wrong} has shape {tuple(state[wrong].shape)}, the model's "
                              f"{tuple(expected[wrong].shape)}: its tensors and model_args disagree")


def check_source(flag, name):
    """A directory named by flag must exist; with no hub in reach, Hugging Face's code uses its cache."""
    parts = name.split("/")  # a hub id is a name or org/name
    if name.startswith(("/", ".", "~")) or len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0])):
        if not os.path.isdir(name):
            raise UsageError(f"{flag}={name!r}: no such directory")
    elif not hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


@functools.lru_cache(maxsize=None)
def hub_reachable(endpoint):
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; the libraries find out themselves
    with contextlib.suppress(OSError):
        url = urllib.parse.urlsplit(endpoint)
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
        return True
    return False


@contextlib.contextmanager
def loading_weights(flag, name):
    """GPT-2 weights that cannot be loaded from name: one line naming the flag that fixes it."""
    check_source(flag, name)
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:
        expected = "" if name in GPT2_SIZES else (": expected gpt2, gpt2-medium, gpt2-large, gpt2-xl, a GPT-2"
                                                  " hub id or a local Hugging Face GPT-2 directory")
        close = difflib.get_close_matches(name, GPT2_SIZES, n=1, cutoff=0.8)
        hint = (f"did you mean {flag}={close[0]}?" if close and close[0] != name
                else f"a local copy works too: {flag}=DIR")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{flag}={name!r}: cannot load GPT-2 weights from {name!r}{expected} ({reason}); "
                         f"{hint}") from None
