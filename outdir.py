"""A run's directory (out_dir): which files are a run's, whether a new run may start there or an
interrupted one continues, and a lock so that one process at a time reads and writes there."""
import contextlib
import os
import re
import tempfile
from types import SimpleNamespace

from checkpoint import CheckpointError, load_checkpoint, same_run
from configurator import UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; out_dir is not guarded there
    fcntl = None

ARCHITECTURE = ("lora_rank", "lora_alpha", "n_layer", "n_head", "n_embd", "block_size")
RUN_FILES = ("ckpt.pt", "ckpt_last.pt", "resume.pt", "metrics.jsonl", "results.json", "predictions.json",
             "last_evaluation.json", "last_predictions.json")


@contextlib.contextmanager
def locked(out_dir, program):
    """Hold out_dir for as long as the block runs: another process that tries is refused, naming
    the holder. The kernel releases the lock when the process ends, however it ends."""
    with open(os.path.join(out_dir, ".lock"), "a+", encoding="utf-8") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise UsageError(f"out_dir={out_dir!r} is in use by {f.read().strip() or 'another process'}; "
                                 "wait for it to end or choose another out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{program} (process {os.getpid()})\n")
        f.flush()
        yield


def check_out_dir(out_dir):
    """Fail before any work if out_dir cannot hold the run's files."""
    if not out_dir.strip():
        raise UsageError("out_dir is empty: name a directory for the run's files")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"out_dir={out_dir!r} is a file, not a directory")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"out_dir={out_dir!r} cannot be created: {existing} is a file")
    try:  # permissions, a read-only disk: only trying tells
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe-"))
    except OSError as e:
        raise UsageError(f"out_dir={out_dir!r} cannot be written: {existing}: {e.strerror}") from None


def holds_run(out_dir):
    return any(os.path.exists(os.path.join(out_dir, f)) for f in ("ckpt.pt", "ckpt_last.pt", "resume.pt", "results.json"))


def holds_progress(out_dir):
    """out_dir holds work that starting afresh would destroy: a finished run, test results, or a best
    checkpoint past iteration 0 (a run killed before its first resume.pt holds nothing a restart loses)."""
    if any(os.path.exists(os.path.join(out_dir, f)) for f in ("ckpt_last.pt", "results.json")):
        return True
    best = os.path.join(out_dir, "ckpt.pt")
    return os.path.isfile(best) and load_checkpoint(best)["iter_num"] > 0


def start_or_resume(config, explicit):
    """(config, resume state or None): continue out_dir's interrupted run where the flags ask for
    it; start afresh only where that destroys no earlier run."""
    out_dir = config.out_dir
    if config.init_from == "resume" or (config.resume == "auto" and os.path.isfile(os.path.join(out_dir, "resume.pt"))):
        return resume_config(config, explicit)
    if config.overwrite:
        return config, None
    if config.resume == "auto" and holds_progress(out_dir):
        raise UsageError(f"out_dir={out_dir!r} holds a run but no resume.pt to continue it from; nothing was "
                         "changed: replace the run with overwrite=true, or choose another out_dir")
    if config.resume == "off" and holds_run(out_dir):
        raise UsageError(f"out_dir={out_dir!r} holds an earlier run; continue it with resume=auto, "
                         "replace it with overwrite=true, or choose another out_dir")
    return config, None


def resume_config(config, explicit):
    """The interrupted run's config, with the flags given now on top; architecture must match."""
    path = os.path.join(config.out_dir, "resume.pt")
    if not os.path.isfile(path):
        raise UsageError(f"init_from=resume: no {path} to resume from; "
                         f"start the run with: python train.py out_dir={config.out_dir}")
    state = load_checkpoint(path)
    if "weights_in" in state:  # a finished run keeps its last weights in ckpt_last.pt only
        last_path = os.path.join(config.out_dir, state["weights_in"])
        last = load_checkpoint(last_path)
        same_run({path: state, last_path: last})
        if last["iter_num"] != state["iter_num"]:
            raise CheckpointError(f"{path} is at iteration {state['iter_num']} but {state['weights_in']} "
                                  f"at {last['iter_num']}; they are not of the same moment")
        state["model"] = last["model"]
    saved = state["config"]
    for key in ARCHITECTURE:
        if key in explicit and getattr(config, key) != saved[key]:
            raise UsageError(f"{key}={getattr(config, key)!r} differs from the checkpoint's {key}={saved[key]!r} "
                             f"in {path}; drop the flag or use a new out_dir")
    merged = SimpleNamespace(**dict(saved, **{k: getattr(config, k) for k in explicit if k != "init_from"}))
    if "init_from" in explicit and config.init_from not in ("resume", saved["init_from"]):
        if state["base"] is None:
            raise UsageError(f"init_from={config.init_from!r} differs from the resumed run's "
                             f"init_from={saved['init_from']!r}, and that run trains every weight, so it continues "
                             "from its own; drop the flag or use a new out_dir")
        merged.init_from = config.init_from  # the same base weights found elsewhere (checked on load)
    return merged, state


def remove_run_files(out_dir):
    """A new run starts in an out_dir without the files of an earlier one, so no two runs mix."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))


def remove_stale_temporaries(out_dir):
    """Temporary files left by a run that was killed while writing."""
    for name in os.listdir(out_dir):
        if re.fullmatch(r"\.(ckpt\.pt|ckpt_last\.pt|resume\.pt|metrics\.jsonl|results\.json|predictions\.json)\..+\.tmp", name):
            os.remove(os.path.join(out_dir, name))
