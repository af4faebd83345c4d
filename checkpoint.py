"""Checkpoint files: what a run trained, and what rebuilds the rest.

A checkpoint holds the trained tensors only: for a LoRA run its A and B matrices plus the identity
of the base model they apply to (init_from and a fingerprint of its weights); for full fine-tuning
every weight. Every file of a run carries the run's id. Files are written atomically, and
checkpoints load without running pickled code.
"""
import hashlib
import os
import pickle
import tempfile
from dataclasses import asdict

import torch

from lora import mark_only_lora_as_trainable
from model import GPT, GPTConfig


CHECKPOINT_VERSION = 2
KEYS = {"version", "run_id", "model", "model_args", "base", "iter_num", "best_val_loss", "config"}
UMASK = os.umask(0o022)
os.umask(UMASK)  # read once: new files get the usual permissions, not mkstemp's owner-only ones


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why."""


def atomic_write(path, write):
    """Write path through a temporary file in the same directory, then rename it into place:
    a kill or a failed write leaves the previous file intact, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.remove(tmp)
        cause = e  # torch.save reports a failed write (a full disk) as a RuntimeError caused by the OSError
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise OSError(f"could not write {path} ({cause.strerror or cause}); the previous file, if any, "
                          "is intact") from None
        raise


def trained_state(model):
    """The parameters that train (LoRA A and B, or every weight), never with LoRA merged in."""
    if any(getattr(m, "has_weights_merged", False) for m in model.modules()):
        raise RuntimeError("refusing to save merged LoRA weights; call model.train() first")
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def base_fingerprint(model):
    """Identity of the frozen weights a LoRA checkpoint applies to: every tensor's name and shape,
    and an evenly spaced sample of its values (a fine-tune changes nearly all of them)."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not name.endswith(("lora_A", "lora_B")):
            sample = t.detach().flatten()[::max(1, t.numel() // 1024)]
            digest.update(f"{name}{tuple(t.shape)}".encode() + sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def make_checkpoint(model, base, **entries):
    """A checkpoint dict of model's trained tensors; base is None for a self-contained model, else
    dict(init_from=..., fingerprint=...) of the weights the tensors apply to."""
    return dict(version=CHECKPOINT_VERSION, model=trained_state(model), model_args=asdict(model.config),
                base=base, **entries)


def is_finite(checkpoint):
    return all(bool(torch.isfinite(t).all()) for t in checkpoint["model"].values())


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True: tensors and plain data, never pickled code."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e).upper():
            raise CheckpointError(f"{path} needs pickled code to load; refused (only tensors and "
                                  "plain data are loaded, for safety)") from None
        reason = "an empty file" if os.path.getsize(path) == 0 else (str(e).strip().splitlines() or [type(e).__name__])[0]
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
    """The model a checkpoint describes. A LoRA checkpoint is applied to its base model (init_from,
    or base= to load it from elsewhere), which must be the one it was trained on."""
    try:
        config = GPTConfig(**checkpoint["model_args"])
    except TypeError as e:
        raise CheckpointError(f"the checkpoint's model_args are not this model's settings ({e})") from None
    if config.n_embd % config.n_head or (config.lora_rank > 0) != (checkpoint["base"] is not None):
        raise CheckpointError(f"the checkpoint's model_args are inconsistent: {checkpoint['model_args']}")
    if checkpoint["base"] is None:
        model = GPT.uninitialized(config)
    else:
        base = base or checkpoint["base"]["init_from"]
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
    if config.lora_rank > 0:
        mark_only_lora_as_trainable(model)
    load_trained(model, checkpoint["model"])
    return model


def load_trained(model, state):
    """Copy a checkpoint's trained tensors into model: exactly the parameters that model trains."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        raise CheckpointError(f"the checkpoint's tensors do not match the model: {len(set(state) - expected)} "
                              f"unexpected, {len(expected - set(state))} missing")
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    wrong = next((name for name, t in state.items() if tuple(t.shape) != shapes[name]), None)
    if wrong:
        raise CheckpointError(f"the checkpoint's {wrong} has shape {tuple(state[wrong].shape)}, "
                              f"the model's {shapes[wrong]}: its tensors and model_args disagree")
    model.load_state_dict(state, strict=False)
