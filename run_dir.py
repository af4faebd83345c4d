"""out_dir, held: the kernel lock that keeps a second process out, the run's checkpoints as a set,
and its results files (results.json and predictions.json, written as a pair). Part of the run
harness; train.py and generate.py reach it through runs.py."""
import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile

from checkpoints import UMASK, load_checkpoint, load_model, same_run, write_json
from configurator import UsageError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; out_dir is not guarded there
    fcntl = None

RUN_FILES = ("ckpt.pt", "ckpt_last.pt", "metrics.jsonl", "results.json", "predictions.json", "predictions.json.next",
             "last_evaluation.json", "last_predictions.json", "last_predictions.json.next")


def check_out_dir(out_dir, flag="out_dir"):
    """Fail before any work where the directory named by flag cannot be made or written."""
    if not out_dir.strip():
        raise UsageError(f"{flag} is empty: name a directory for the run's files")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        raise UsageError(f"{flag}={out_dir!r} is a symbolic link to {os.readlink(out_dir)!r}, which does not exist")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{flag}={out_dir!r} is a file, not a directory")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag}={out_dir!r} cannot be created: {existing} is a file")
    try:  # permissions, a read-only disk: only trying tells
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".probe-"))
    except OSError as e:
        raise UsageError(f"{flag}={out_dir!r} cannot be written: {existing}: {e.strerror}") from None


class Run:
    """out_dir, held by this process until close(): a kernel lock on out_dir/.lock that a second
    process is refused. A missing out_dir is made first, and removed at close if nothing was written."""

    def __init__(self, out_dir, program, create=True, lock=True):
        self.out_dir, self.made, self.lock_fd, self.run_id, self.trained_with = out_dir, [], None, None, None
        check_out_dir(out_dir)
        missing = []
        path = os.path.abspath(out_dir)
        while create and not os.path.exists(path):
            missing.append(path)
            path = os.path.dirname(path)
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another process may make it at the same moment
                os.mkdir(path)
                self.made.insert(0, path)
        if lock and os.path.isdir(out_dir):
            self.lock_fd = take_lock(out_dir, program)
            self.finish_pending_predictions()
            for name in os.listdir(out_dir):  # temporary files of a process killed while writing
                if re.fullmatch(r"\.(.+)\.\w+\.tmp", name) and name.split(".")[1] in {f.split(".")[0] for f in RUN_FILES}:
                    os.remove(self.path(name))
        elif lock and create:  # made, then removed by a process that gave it up: never go on unlocked
            raise UsageError(f"out_dir={out_dir!r} was removed as this process started; run it again")

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def close(self):
        if self.lock_fd is None:
            return
        if self.made and os.listdir(self.out_dir) == [".lock"]:  # stopped before it wrote anything
            os.remove(self.path(".lock"))
            for path in self.made:
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        os.close(self.lock_fd)
        self.lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def checkpoints(self, which):
        """[(name, checkpoint)] of ckpt.pt ("best") and ckpt_last.pt ("last"), all of one run."""
        found = {}
        for key in which:
            path = self.path(CHECKPOINTS[key][1])
            if not os.path.isfile(path):
                raise UsageError(f"no checkpoint at {path}; make one with: python train.py out_dir={self.out_dir}")
            found[path] = load_checkpoint(path)
        same_run(found)
        self.run_id = next(iter(found.values()))["run_id"]
        return [(CHECKPOINTS[key][0], checkpoint) for key, checkpoint in zip(which, found.values())]

    def load_checkpoints(self, config, explicit):
        """(model, [(name, checkpoint)]): generate.py's checkpoints (its ckpt flag), and a model of their
        base (config.base where it is no longer at the run's init_from) with the first one's trained
        tensors. config's dataset and prompt_template become the run's where they were not given."""
        ckpt = config.ckpt or ("best" if config.text or config.file else "both")
        checkpoints = self.checkpoints(("best", "last") if ckpt == "both" else (ckpt,))
        self.trained_with = checkpoints[0][1]["config"]
        for key in {"dataset", "prompt_template"} - set(explicit):
            setattr(config, key, self.trained_with[key])
        return load_model(checkpoints[0][1], config.base or None), checkpoints

    def write_results(self, rows, sets, config):
        """results.json and predictions.json keep a run's complete greedy test evaluations, one row per
        checkpoint, method and reading, each replaced only by a newer one of its own. Anything else (a
        subset, another split, sampling, a raw model beside a run's checkpoints) goes to
        last_evaluation.json and last_predictions.json. Returns the results file's path."""
        run_id, split = self.run_id, config.split
        complete = (split == "test" and config.num_examples == 0 and config.temperature == 0
                    and config.max_new_tokens == handout_answer_tokens())
        if self.trained_with is not None:  # a run's checkpoints: on the data and prompt they were trained with
            complete = complete and (config.dataset, config.prompt_template) == (
                self.trained_with["dataset"], self.trained_with["prompt_template"])
        beside_a_run = run_id is None and any(os.path.exists(self.path(f)) for f in ("ckpt.pt", "ckpt_last.pt"))
        names = ("results.json", "predictions.json") if complete and not beside_a_run else (
            "last_evaluation.json", "last_predictions.json")
        results_path, predictions_path = map(self.path, names)
        old = read_results(results_path, predictions_path) if complete else None
        if old and old.get("run_id") == run_id:  # keep the rows this evaluation does not replace
            new, now = {row_key(r) for r in rows}, {r["checkpoint"]: r["iter_num"] for r in rows}
            kept = {row_key(r) for r in old["results"] if row_key(r) not in new and now.get(r["checkpoint"], r.get("iter_num"))
                    == r.get("iter_num")}  # a row of an earlier state of a checkpoint evaluated now is dropped
            rows = [r for r in old["results"] if row_key(r) in kept] + rows
            old_sets = read_json(predictions_path)  # whole: read_results checked its hash
            sets = [s for s in old_sets if row_key(s) in kept] + sets
        # the pair changes together: the predictions wait beside the old ones until results.json, written
        # second, names them by their hash; one left waiting is moved into place by the next process
        pending = predictions_path + ".next"
        write_json(pending, sets)
        try:
            write_json(results_path, dict(run_id=run_id, split=split, complete=complete, results=rows,
                                          predictions_sha1=file_sha1(pending)))
        except BaseException:
            os.remove(pending)
            raise
        os.replace(pending, predictions_path)
        return results_path

    def finish_pending_predictions(self):
        """A pair of results files left half-replaced by a killed process is completed, or left as it was."""
        for results, predictions in (("results.json", "predictions.json"), ("last_evaluation.json", "last_predictions.json")):
            pending = self.path(predictions + ".next")
            if os.path.isfile(pending):
                named = (read_results(self.path(results)) or {}).get("predictions_sha1")
                if named == file_sha1(pending):
                    os.replace(pending, self.path(predictions))
                else:
                    os.remove(pending)


CHECKPOINTS = {"best": ("Best Val Checkpoint", "ckpt.pt"), "last": ("Last Iter Checkpoint", "ckpt_last.pt")}


def handout_answer_tokens():
    """How many tokens generate.py reads an answer off by default: the run's test accuracy uses these."""
    import generate
    return generate.FLAGS["max_new_tokens"][0]


def file_sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def is_tested(out_dir):
    """Whether results.json holds the greedy test accuracy of both of out_dir's checkpoints as they are
    now: rows of their run, at their iterations."""
    results, at = read_results(*(os.path.join(out_dir, f) for f in ("results.json", "predictions.json"))) or {}, {}
    for name, filename in CHECKPOINTS.values():
        path = os.path.join(out_dir, filename)
        if not os.path.isfile(path):
            return False
        checkpoint = load_checkpoint(path, mmap=True)  # tensors mapped, not read
        at[name] = checkpoint["run_id"], checkpoint["iter_num"]
    return all(any((r["checkpoint"], r["method"], r["parse"]) == (name, "generate", "near_start") and
                   (results.get("run_id"), r.get("iter_num")) == at[name] for r in results.get("results", [])) for name in at)


def row_key(row):
    return row["checkpoint"], row["method"], row["parse"]


def read_results(path, predictions=None):
    """A results file of ours ({"run_id", "results": rows}), or None where it is missing or not one,
    or where its predictions file (given) is not the one it names: such a pair is replaced, never read."""
    results = read_json(path)
    rows = results.get("results") if isinstance(results, dict) else None
    ok = isinstance(rows, list) and all(isinstance(r, dict) and {"checkpoint", "method", "parse"} <= set(r) for r in rows)
    if ok and predictions is not None:
        ok = os.path.isfile(predictions) and results.get("predictions_sha1") == file_sha1(predictions)
    return results if ok else None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def hold(out_dir, program, create=False, lock=True):
    """out_dir held for reading and writing evaluations; made if missing where create is true."""
    return Run(out_dir, program, create=create, lock=lock)


def take_lock(out_dir, program):
    """Lock out_dir/.lock, a regular file (never a link followed out of out_dir), and write into it
    who holds it. Returns its file descriptor; the kernel releases the lock when the process ends."""
    path = os.path.join(out_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666 & ~UMASK)
    except OSError as e:
        raise UsageError(f"{path} cannot be opened as a lock file ({e.strerror}); remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path} is not a regular file; remove it")
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"out_dir={out_dir!r} is in use by {holder}; wait for it to end or choose another "
                             "out_dir") from None
    if not os.path.exists(path) or not os.path.samestat(os.stat(path), os.fstat(fd)):
        os.close(fd)  # removed by a process that gave out_dir up as we opened it
        raise UsageError(f"out_dir={out_dir!r} changed hands as this process started; run it again")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{program} (process {os.getpid()})\n".encode(), 0)
    return fd
