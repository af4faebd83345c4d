"""Checkpoint files, and the GPT-2 weights they apply to: part of the run harness (runs.py).

A checkpoint holds the trained tensors only: for a LoRA run the A and B matrices (lora_state_dict)
and the identity of the base model they apply to (its init_from and a CRC-32 of each of its
tensors); for full fine-tuning every weight. Files are written atomically and loaded without
pickled code; weights that cannot be loaded are one line naming the flag that fixes it.
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

from configurator import TRUE, UsageError, is_local_path
from lora import lora_state_dict, mark_only_lora_as_trainable
from model import GPT, GPTConfig

CHECKPOINT_VERSION = 3
KEYS = {"version", "run_id", "model", "model_args", "base", "iter_num", "best_val_loss", "config"}
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: new files get the usual permissions, not mkstemp's owner-only ones


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used; the message says why."""


# -----------------------------------------------------------------------------
# where weights come from

def check_source(flag, name):
    """Before anything is loaded: a directory named by flag must exist; where the hub cannot be
    reached, the Hugging Face libraries are told to use their local cache at once instead of
    retrying for a minute (so call it before they are imported)."""
    if is_local_path(name):
        if not os.path.isdir(name):
            raise UsageError(f"{flag}={name!r}: no such directory")
    elif not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"


def hub_reachable():
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in TRUE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; the libraries find out themselves
    return answers(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=None)
def answers(url):
    endpoint = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def loading_weights(flag, name):
    """Where name is, checked first (check_source); weights that cannot be loaded from there: one line
    that names the flag that fixes it."""
    check_source(flag, name)
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:
        expected = "" if name in GPT2_SIZES else (": expected gpt2, gpt2-medium, gpt2-large, gpt2-xl, a GPT-2 hub id "
                                                  "or a local Hugging Face GPT-2 directory")
        close = difflib.get_close_matches(name, GPT2_SIZES, n=1, cutoff=0.8)
        hint = f"did you mean {flag}={close[0]}?" if close and close[0] != name else f"a local copy works too: {flag}=DIR"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"{flag}={name!r}: cannot load GPT-2 weights from {name!r}{expected} ({reason}); {hint}") from None


# -----------------------------------------------------------------------------
# checkpoint files

def atomic_write(path, write):
    """Write path through a new temporary file beside it, then rename that into place: a kill or
    a failed write leaves the previous file intact, never a torn one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            os.remove(tmp)
        cause = e  # torch.save reports a failed write (a full disk) as a RuntimeError caused by the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise OSError(f"could not write {path} ({cause.strerror or cause}); the previous file, if any, "
                          "is intact") from None
        raise


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def trained_state(model):
    """What a run trains: the LoRA matrices, or every weight (the tied lm_head once, as wte)."""
    if model.config.lora_rank > 0:
        return lora_state_dict(model)
    return {name: p.detach() for name, p in model.named_parameters()}


def checkpoint_of(model, base, **entries):
    """A checkpoint of model's trained tensors; base is the identity of the weights they apply to (a
    LoRA run's), or None."""
    return dict(version=CHECKPOINT_VERSION, model=trained_state(model), model_args=asdict(model.config), base=base,
                **entries)


def base_fingerprint(model):
    """Identity of the frozen weights a LoRA checkpoint applies to: every tensor's name and shape and a
    CRC-32 of its bytes (a change to any value shows, but for one chance in four billion; 0.3 s for
    gpt2-medium, where hashing its 1.4 GB with sha256 takes 1.2 s)."""
    if any(getattr(m, "has_weights_merged", False) for m in model.modules()):
        raise RuntimeError("the base weights have LoRA merged into them; call model.train() first")
    digest = hashlib.sha256()
    for name, t in model.named_parameters(remove_duplicate=True):
        if "lora_" not in name:
            crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy())
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}{crc}".encode())
    return digest.hexdigest()[:16]


def load_checkpoint(path, map_location="cpu", mmap=False):
    """A checkpoint of this project, loaded with weights_only=True: tensors and plain data, never
    pickled code. mmap: tensors mapped from the file, read only where used."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):
            raise CheckpointError(f"{path} needs pickled code to load; refused (only tensors and "
                                  "plain data are loaded, for safety)") from None
        text = str(e).split("WeightsUnpickler error:")[-1]  # not PyTorch's advice to load it unsafely
        reason = "an empty file" if os.path.getsize(path) == 0 else (text.strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is corrupt or truncated ({reason})") from None
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('version')!r}; "
                              f"this code reads format {CHECKPOINT_VERSION}")
    if not KEYS <= set(checkpoint):
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(sorted(KEYS - set(checkpoint)))}")
    if not isinstance(checkpoint["model"], dict) or not all(torch.is_tensor(t) for t in checkpoint["model"].values()):
        raise CheckpointError(f"{path} is incomplete: its 'model' is not a set of tensors")
    return checkpoint


def same_run(checkpoints):
    """Refuse files of different runs (an overwritten run's leftovers, files copied between runs)."""
    ids = {path: c["run_id"] for path, c in checkpoints.items()}
    if len(set(ids.values())) > 1:
        raise CheckpointError("these files belong to different runs: " +
                              ", ".join(f"{path} (run {run_id})" for path, run_id in ids.items()))


def load_model(checkpoint, base=None):
    """The model a checkpoint describes. A LoRA checkpoint is applied to its base model (its
    init_from, or base= where the same weights are elsewhere), which must be the one it trained on."""
    try:
        config = GPTConfig(**checkpoint["model_args"])
    except TypeError as e:
        raise CheckpointError(f"the checkpoint's model_args are not this model's settings ({e})") from None
    if config.n_embd % config.n_head or (config.lora_rank > 0) != (checkpoint["base"] is not None):
        raise CheckpointError(f"the checkpoint's model_args are inconsistent: {checkpoint['model_args']}")
    with torch.device("meta"):  # its shapes, allocating nothing: model_args may be damaged
        check_tensors(trained_state(mark_only_lora_as_trainable(GPT(config)) if config.lora_rank else GPT(config)),
                      checkpoint)
    if checkpoint["base"] is None:
        model = GPT.uninitialized(config)
    else:
        base = base or checkpoint["base"]["init_from"]
        with loading_weights("base", base):
            model = GPT.from_pretrained(base, dict(dropout=config.dropout, lora_rank=config.lora_rank,
                                                   lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout))
        differs = next((k for k, v in asdict(model.config).items() if checkpoint["model_args"][k] != v), None)
        if differs:
            raise CheckpointError(f"the checkpoint's model_args have {differs}={checkpoint['model_args'][differs]!r}, "
                                  f"its base model {differs}={getattr(model.config, differs)!r}")
        if base_fingerprint(model) != checkpoint["base"]["fingerprint"]:
            raise CheckpointError(f"the adapter was trained on {checkpoint['base']['init_from']} (weights "
                                  f"{checkpoint['base']['fingerprint']}), not on {base} (weights "
                                  f"{base_fingerprint(model)}); give the base it was trained on")
        mark_only_lora_as_trainable(model)
    load_trained(model, checkpoint)
    return model


def load_trained(model, checkpoint):
    """Copy a checkpoint's trained tensors into model (a model of the same run's shape)."""
    model.train()  # LoRA unmerged first: eval() merges the new A and B afresh
    check_tensors(trained_state(model), checkpoint)
    model.load_state_dict(checkpoint["model"], strict=False)


def check_tensors(expected, checkpoint):
    state = checkpoint["model"]
    if set(state) != set(expected):
        raise CheckpointError(f"the checkpoint's tensors do not match the model: {len(set(state) - set(expected))} "
                              f"unexpected, {len(set(expected) - set(state))} missing")
    wrong = next((name for name, t in state.items() if t.shape != expected[name].shape), None)
    if wrong:
        raise CheckpointError(f"the checkpoint's {wrong} has shape {tuple(state[wrong].shape)}, the model's "
                              f"{tuple(expected[wrong].shape)}: its tensors and model_args disagree")
