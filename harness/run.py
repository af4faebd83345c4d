"""out_dir, held by one process at a time, and the training run in it.

The lock is the kernel's (flock on out_dir/.lock, a file never removed): a killed process never blocks
the next. A missing out_dir is made, and locked, only when something is first written into it. Starting
afresh never destroys a run; resuming continues one exactly (its AdamW and random state).
"""
import contextlib
import fcntl
import json
import os
import stat
import tempfile
import time
import uuid
from types import SimpleNamespace

import torch

from harness.checkpoints import (UMASK, CheckpointError, atomic_write, base_fingerprint, checkpoint_of,
                                 load_checkpoint, read_json, save_checkpoint)
from finetune import other_methods_settings
from harness.flags import Diverged, UsageError

CHECKPOINTS = {"best": ("Best Val Checkpoint", "ckpt.pt"), "last": ("Last Iter Checkpoint", "ckpt_last.pt")}
RUN_FILES = ("ckpt.pt", "ckpt_last.pt", "metrics.jsonl", "results.json", "last_evaluation.json")
RESUME_KEYS = {"optimizer", "scaler", "rng"}  # ckpt_last.pt holds these too: a run resumes from it
BEFORE_METHODS = dict(method="lora", adapter_size=0, prefix_length=0)  # what runs saved before these flags
MACHINE = ("out_dir", "device", "dtype", "compile", "debug")  # this command's, never a resumed run's
# what a run is: its model, and what decides which reviews each step trains on and how they read
FIXED = ("method", "lora_rank", "lora_alpha", "adapter_size", "prefix_length", "n_layer", "n_head", "n_embd",
         "block_size", "seed", "prompt_template", "mask_prompt")


def check_out_dir(path, flag="out_dir"):
    """Fail before any work where the directory named by flag cannot be made or written."""
    if not path.strip():
        raise UsageError(f"{flag} is empty: name a directory for the run's files")
    if os.path.islink(path) and not os.path.exists(path):
        raise UsageError(f"{flag}={path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        problem = ("is a file, not a directory" if existing == os.path.abspath(path)
                   else f"cannot be created: {existing} is a file")
        raise UsageError(f"{flag}={path!r} {problem}")
    try:  # permissions, a read-only disk: only trying tells
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe-"))
    except OSError as e:
        raise UsageError(f"{flag}={path!r} cannot be written: {existing}: {e.strerror}") from None


class OutDir(contextlib.AbstractContextManager):
    """out_dir, locked by this process from now (if it is missing: from the first write) until close."""

    def __init__(self, path, program, lock=True):
        check_out_dir(path)
        self.path, self.program, self.fd, self.made = path, program, None, not os.path.isdir(path)
        if lock and not self.made:
            self.lock()

    def __exit__(self, *exc):
        self.close()

    def file(self, name):
        return os.path.join(self.path, name)

    def lock(self):
        if self.fd is None:
            os.makedirs(self.path, exist_ok=True)
            self.fd = take_lock(self.path, self.program)
            if self.made and any(os.path.exists(self.file(f)) for f in RUN_FILES):
                raise UsageError(f"out_dir={self.path!r} was taken by another process as this one started; "
                                 "nothing was written: choose another out_dir")
            for name in os.listdir(self.path):  # the temporary file of a process killed while writing
                if name.endswith(".tmp") and name.startswith(tuple(f".{f}." for f in RUN_FILES)):
                    os.remove(self.file(name))

    def write(self, name, write):
        self.lock()
        atomic_write(self.file(name), write)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)  # the kernel releases the lock
            self.fd = None

    def checkpoints(self, which):
        """[(name, checkpoint)] of ckpt.pt ("best") and ckpt_last.pt ("last"), refused unless every checkpoint
        in out_dir is of one run (one not asked for is mapped, not read)."""
        found = {}
        for key, (_, name) in CHECKPOINTS.items():
            if key in which and not os.path.isfile(self.file(name)):
                raise UsageError(f"no checkpoint at {self.file(name)}; make one with: python train.py "
                                 f"out_dir={self.path}")
            if os.path.isfile(self.file(name)):
                found[key] = load_checkpoint(self.file(name), mmap=key not in which)
        same_run({self.file(CHECKPOINTS[key][1]): checkpoint for key, checkpoint in found.items()})
        return [(CHECKPOINTS[key][0], found[key]) for key in which]

    def latest(self):
        """The latest checkpoint (tensors mapped, not read): where the run's data and base weights are now."""
        name = "ckpt_last.pt" if os.path.isfile(self.file("ckpt_last.pt")) else "ckpt.pt"
        return load_checkpoint(self.file(name), mmap=True)


def take_lock(path, program):
    """flock out_dir/.lock, a regular file (never a link out of out_dir), and write in it who holds it."""
    lock = os.path.join(path, ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666 & ~UMASK)
    except OSError as e:
        raise UsageError(f"{lock} cannot be opened as a lock file ({e.strerror}); remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{lock} is not a regular file; remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"out_dir={path!r} is in use by {holder}; wait for it to end or choose another "
                         "out_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{program} (process {os.getpid()})\n".encode(), 0)
    return fd


def same_run(checkpoints):
    """checkpoints ({path: checkpoint}), refused where they are of different runs."""
    if len({c["run_id"] for c in checkpoints.values()}) > 1:
        raise CheckpointError("these files belong to different runs: " +
                              ", ".join(f"{path} (run {c['run_id']})" for path, c in checkpoints.items()))
    return checkpoints


def survey(out, read_checkpoints=True):
    """What out_dir holds that decides between starting and resuming (checkpoints mapped, not read; none
    where they are to be replaced whatever they hold)."""
    found = dict(files={f for f in RUN_FILES if os.path.exists(out.file(f))}, metrics_run=None)
    for key, (_, name) in CHECKPOINTS.items():
        readable = read_checkpoints and name in found["files"]
        found[key] = load_checkpoint(out.file(name), mmap=True) if readable else None
    found["evaluations"] = [read_json(out.file(f)) for f in RUN_FILES[3:] if f in found["files"]]
    with contextlib.suppress(OSError, ValueError, AttributeError):
        with open(out.file("metrics.jsonl"), encoding="utf-8") as f:
            found["metrics_run"] = json.loads(f.readline()).get("run_id")
    return found


def start_or_resume(config, explicit, found, world=1):
    """(config, checkpoint to resume from or None): what the flags ask of out_dir as survey found it."""
    if config.overwrite and (config.resume == "auto" or config.init_from == "resume"):
        raise UsageError("overwrite=true contradicts resume=auto and init_from=resume: give one of them")
    if config.init_from == "resume" or (config.resume == "auto" and found["last"] is not None):
        return resumed_config(config, explicit, found, world), found["last"]
    if config.overwrite:
        return config, None
    if config.resume == "off" and found["files"] - {"metrics.jsonl"}:
        raise UsageError(f"out_dir={config.out_dir!r} holds an earlier run; continue it with resume=auto, "
                         "replace it with overwrite=true, or choose another out_dir")
    best = found["best"]  # a run killed before its first ckpt_last.pt (perhaps evaluated) has nothing to lose
    ours = [isinstance(e, dict) and best and e.get("run_id") == best["run_id"] for e in found["evaluations"]]
    if (best and best["iter_num"] > 0) or not all(ours):
        raise UsageError(f"out_dir={config.out_dir!r} holds a run but no ckpt_last.pt to continue it from; "
                         "nothing was changed: replace the run with overwrite=true, or choose another "
                         "out_dir")
    return config, None


def resumed_config(config, explicit, found, world):
    """The interrupted run's config with the flags given now on top; its files whole and of one run."""
    last, best = found["last"], found["best"]
    path, best_path = os.path.join(config.out_dir, "ckpt_last.pt"), os.path.join(config.out_dir, "ckpt.pt")
    if last is None:
        raise UsageError(f"init_from=resume: no {path} to resume from; start the run with: python train.py "
                         f"out_dir={config.out_dir}")
    if not RESUME_KEYS <= set(last):
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(sorted(RESUME_KEYS - set(last)))}")
    if len(last["rng"]) != world:
        saved_by = len(last["rng"])
        raise UsageError(f"{path} was saved by {saved_by} processes and this is {world}; resume it with the "
                         f"same number (torchrun --nproc_per_node={saved_by}, or 1: python train.py)")
    if best is None:
        raise CheckpointError(f"{path} has no {best_path} beside it; continue the run from a whole copy "
                              "of its out_dir")
    same_run({path: last, best_path: best})
    if found["metrics_run"] not in (None, last["run_id"]):
        raise CheckpointError(f"{os.path.join(config.out_dir, 'metrics.jsonl')} holds rows of another run "
                              f"than {path}'s ({last['run_id']}); nothing was changed")
    saved = dict(BEFORE_METHODS, **last["config"])
    unused = other_methods_settings(saved["method"])  # given, they are refused as not the method's own
    for key in FIXED:
        if key in explicit and key not in unused and getattr(config, key) != saved[key]:
            raise UsageError(f"{key}={getattr(config, key)!r} differs from the checkpoint's "
                             f"{key}={saved[key]!r} in {path}; drop the flag or use a new out_dir")
    merged = SimpleNamespace(**dict(saved, **{k: getattr(config, k) for k in set(explicit) | set(MACHINE)}))
    merged.init_from = saved["init_from"]
    if best["iter_num"] > max(last["iter_num"], merged.max_iters):  # an extension killed between its writes
        raise UsageError(f"{best_path} is at iteration {best['iter_num']}, past {path}'s {last['iter_num']}: "
                         f"an extension to max_iters={best['config']['max_iters']} was interrupted; continue "
                         "it with that max_iters")
    if last["iter_num"] > merged.max_iters:
        raise UsageError(f"out_dir={config.out_dir!r} holds a run at iteration {last['iter_num']}, past "
                         f"max_iters={merged.max_iters}; nothing was changed: give "
                         f"max_iters={last['iter_num']} or more to continue it")
    if "init_from" in explicit and config.init_from not in ("resume", saved["init_from"]):
        if config.init_from == "scratch":
            raise UsageError(f"init_from=scratch starts a new model; the run in {config.out_dir} continues "
                             "from its own: drop the flag or use a new out_dir")
        if last["base"] is None:
            raise UsageError(f"init_from={config.init_from!r} differs from the resumed run's init_from="
                             f"{saved['init_from']!r}, and that run trains every weight, so it continues "
                             "from its own; drop the flag or use a new out_dir")
        merged.init_from = config.init_from  # the same base weights found elsewhere (checked as they load)
    return merged


def open_run(config, explicit, rank=0, world=1):
    """out_dir held for training (by process 0 of a torchrun, which alone writes) and a TrainingRun: its
    config is the run's, its resume the checkpoint it continues from (or None), decided under the lock."""
    run = TrainingRun(config.out_dir, "train.py", lock=rank == 0)
    run.rank, run.world, run.master = rank, world, rank == 0
    try:
        found = survey(run, read_checkpoints=not config.overwrite)
        run.config, resume = start_or_resume(config, explicit, found, world)
        run.resume = resume and load_checkpoint(run.file("ckpt_last.pt"))  # read whole, no longer mapped
    except BaseException:
        run.close()
        raise
    run.run_id = run.resume["run_id"] if run.resume else uuid.uuid4().hex[:12]
    run.base = run.resume and run.resume["base"]
    if run.base and run.config.init_from != run.resume["config"]["init_from"]:  # the same base weights, moved
        run.base = dict(run.base, init_from=located(run.config.init_from))
    if run.resume:  # the log and the clock go on from the run's iteration
        run.rows = [r for r in read_metrics(run.file("metrics.jsonl")) if r["iter"] <= run.resume["iter_num"]]
    run.t0 = time.time() - (run.rows[-1].get("elapsed", 0.0) if run.rows else 0.0)
    return run


class TrainingRun(OutDir):
    """The run train.py trains: its config, the checkpoint it resumes from, what it writes."""
    config = resume = base = run_id = data = None
    master, started, rows, t0, rank, world = True, False, (), 0.0, 0, 1

    def save(self, name, model, iter_num, best_val_loss, optimizer=None, scaler=None, rng=None):
        """Write a checkpoint of what model trains (process 0 writes); with the optimizer and scaler
        (ckpt_last.pt), a state to resume from, with every process's random state (default: now)."""
        if optimizer is not None:
            rng = [rng or rng_state(str(next(model.parameters()).device))] * self.world
            if self.world > 1:
                torch.distributed.all_gather_object(rng, rng[0])
        if not self.master:
            return
        self.start()
        if self.base is None and not all(p.requires_grad for p in model.parameters()):
            self.base = dict(init_from=located(self.config.init_from), fingerprint=base_fingerprint(model))
        checkpoint = checkpoint_of(model, self.base, run_id=self.run_id, iter_num=iter_num, data=self.data,
                                   best_val_loss=best_val_loss, config=vars(self.config))
        if optimizer is not None:
            checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng)
        # a sum is finite only where every element is: 100x faster than torch.isfinite on some CPU builds
        if not all(torch.isfinite(t.sum(dtype=torch.float64)) for t in checkpoint["model"].values()):
            raise Diverged(f"the weights are not finite at iteration {iter_num}; checkpoints left as they "
                           "were")
        save_checkpoint(self.file(name), checkpoint)

    def log(self, **row):
        """Append a row to metrics.jsonl, with the time since the run began; returns the row."""
        row["elapsed"] = round(time.time() - self.t0, 2)
        if self.master:
            self.start()
            with open(self.file("metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def start(self):
        """Before the first write, every check passed: a new run removes an earlier run's files, a resumed
        one keeps its metrics up to its iteration."""
        if not self.started:
            self.started = True
            self.lock()
            for name in RUN_FILES if self.resume is None else ():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.file(name))
            lines = "".join(json.dumps(r) + "\n" for r in [dict(run_id=self.run_id), *self.rows])
            atomic_write(self.file("metrics.jsonl"), lambda f: f.write(lines.encode()))


def located(name):
    """Where weights named name are from any directory: a local directory's absolute path, or a hub id."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def rng_state(device):
    """The random state dropout draws from, to resume exactly."""
    cuda = torch.cuda.get_rng_state(device) if device.startswith("cuda") else None
    return dict(cpu=torch.get_rng_state(), cuda=cuda)


def read_metrics(path):
    """The rows of a metrics.jsonl; its first line (the run's id) and a line torn by a kill are skipped."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and type(row.get("iter")) is int and all(
                        isinstance(v, (int, float)) for k, v in row.items() if k != "run"):
                    rows.append(row)
    return rows

