"""Checkpoint files: a snapshot of the model and training state, written atomically (on a
background thread while training goes on), and loaded without running pickled code."""
import contextlib
import os
import pickle
import threading
from dataclasses import asdict

import torch

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why."""


def atomic_write(path, write):
    """Write path through a temporary file in the same directory, then rename it into place:
    a kill or a failed write leaves the previous file intact, never a torn one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(f"could not write {path} ({e.strerror or e}); the previous file, if any, is intact") from None
        raise


def host_copy(obj):
    """obj with every tensor copied to host memory, through dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def snapshot_checkpoint(model, trainable_only=False, copy=True, **extra):
    """The checkpoint of model (never with merged LoRA weights; with trainable_only, just the
    parameters that train) with its model_args and the extra entries, as it is now: what training
    changes (trainable parameters, tensors in extra) is copied to host memory, so training can go
    on while it is written. Frozen weights are not copied: write it before LoRA merges them.
    With copy=False nothing is copied: for a write that finishes before training resumes."""
    if any(getattr(m, "has_weights_merged", False) for m in model.modules()):
        raise RuntimeError("refusing to save merged LoRA weights; call model.train() first")
    trainable = trainable_names(model)
    state, copies = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        if trainable_only and name not in trainable:
            continue
        if t.requires_grad and copy:
            if id(t) not in copies:  # tied weights (wte, lm_head) are copied once and stay shared
                copies[id(t)] = host_copy(t)
            state[name] = copies[id(t)]
        else:
            state[name] = t.detach()
    return dict(version=CHECKPOINT_VERSION, model=state, model_args=asdict(model.config),
                **(host_copy(extra) if copy else extra))


def write_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with weights_only=True: tensors and plain data, never pickled code."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} needs pickled code to load; refused (only tensors and "
                              "plain data are loaded, for safety)") from None
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or "model_args" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('version')!r}; "
                              f"this code reads format {CHECKPOINT_VERSION}")
    return checkpoint


class CheckpointWriter:
    """Writes on a background thread, one write at a time, so training goes on meanwhile."""

    def __init__(self):
        self.thread, self.error = None, None

    def submit(self, write):
        self.wait()
        def run():
            try:
                write()
            except BaseException as e:  # raised in the training thread by the next wait()
                self.error = e
        self.thread = threading.Thread(target=run, name="checkpoint-writer")
        self.thread.start()

    def join(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def wait(self):
        """Block until the write in flight is done; raise its error, if it failed."""
        self.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
