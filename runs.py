"""The run harness: what keeps a run's directory (out_dir) safe and its results whole. Not part of
the homework; train.py and generate.py call it in a few lines:

    with runs.reported_errors("train.py", debug):             # a mistake: one line, exit status 2
        with runs.open_run(config, explicit) as run:          # lock out_dir, then start afresh or resume
            iter_num, best_val_loss = run.restore(optimizer, scaler, device)  # where to go on from
            run.log(iter=..., val_loss=...)                   # metrics.jsonl (and wandb), the progress bar
            run.save("ckpt.pt", model, ...)                   # a checkpoint, written atomically
            run.finish(...)
    with runs.hold(out_dir, "generate.py") as run:           # the lock, for reading and evaluating
        model, checkpoints = run.load_checkpoints(config, explicit)
        run.write_results(rows, predictions, config)

One process at a time holds an out_dir (a kernel lock, released however the process ends). A
checkpoint holds the trained tensors only: for a LoRA run the A and B matrices (lora_state_dict)
and the identity of the base model they apply to; for full fine-tuning every weight. ckpt.pt is the
best validation loss; ckpt_last.pt the latest state, with AdamW and every process's random state,
to resume from. Every file carries the run's id; files are written atomically and loaded without
pickled code. Sections: errors; data and reviews given by the user; a training run; metrics. The
run directory (the lock, the checkpoints as a set, the results files) is in run_dir.py; checkpoint
files, and where weights come from, in checkpoints.py.
"""
import contextlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from types import SimpleNamespace

import torch

# checkpoint files, which train.py and generate.py too reach through this module (runs.load_model, ...)
from checkpoints import (UMASK, CheckpointError, atomic_write, base_fingerprint, check_source, checkpoint_of,
                         load_checkpoint, load_model, load_trained, loading_weights, same_run, save_checkpoint)
from configurator import UsageError, fail, parse_flags
# the run directory, which generate.py, export.py and report.py too reach through this module (runs.hold, ...)
from run_dir import RUN_FILES, Run, check_out_dir, handout_answer_tokens, hold, is_tested, read_json, read_results

RESUME_KEYS = {"optimizer", "scaler", "rng"}  # ckpt_last.pt holds these too: it is where a run resumes
MACHINE = ("out_dir", "device", "dtype", "compile", "debug")  # flags of this command, never a resumed run's
ARCHITECTURE = ("lora_rank", "lora_alpha", "n_layer", "n_head", "n_embd", "block_size")
KEY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wandb_api.json")


class DataError(UsageError):
    """A dataset that cannot be used; the message names the split and where."""


class Diverged(RuntimeError):
    """The loss or the weights are no longer finite: rerunning the same command will not help."""


@contextlib.contextmanager
def reported_errors(program, debug=False):
    """A mistake the user can fix (flags, data, files, disks) becomes one line and exit status 2; a
    diverged run one line and exit status 1. debug=True shows the traceback instead."""
    try:
        yield
    except (UsageError, OSError, Diverged) as e:
        if debug:
            raise
        if isinstance(e, Diverged):
            print(f"{program}: error: {e}", file=sys.stderr)
            sys.exit(1)
        fail(program, str(e))


# -----------------------------------------------------------------------------
# data and reviews given by the user

def read_jsonl_splits(directory, splits):
    """{split: records} from directory/<split>.jsonl, a local copy of a dataset: one JSON object
    {"text": ..., "label": 0 or 1} a line."""
    return {split: _read_jsonl(os.path.join(directory, f"{split}.jsonl"), split) for split in splits}


def _read_jsonl(path, split):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise DataError(f"{split} split: {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{split} split: {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{split} split: {path}:{n}: malformed JSON ({e.msg})") from None
        records.append(checked_record(rec, f"{split} split: {path}:{n}"))
    if not records:
        raise DataError(f"{split} split: {path} holds no examples")
    return records


def checked_record(rec, where):
    """{"text", "label"} of a dataset's row: a review and 0 or 1; else one line that says where."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with 'text' and 'label'")
    if not isinstance(rec.get("text"), str) or not rec["text"].strip():
        raise DataError(f"{where}: 'text' is missing or empty")
    if rec.get("label") not in (0, 1) or isinstance(rec.get("label"), bool):
        raise DataError(f"{where}: 'label' must be 0 or 1, got {rec.get('label')!r}")
    return {"text": rec["text"], "label": rec["label"]}


def read_reviews(text, file):
    """The reviews given with generate.py's text= (a list) and file= (none without them): one per line of the
    file (split at '\n' only: U+0085 and the like stay inside a review), '-' for standard input."""
    texts = list(text)
    try:
        if file == "-":
            texts += sys.stdin.read().split("\n")
        elif file:
            with open(file, encoding="utf-8", newline="") as f:
                texts += f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"file={file!r}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    reviews = [t.strip() for t in texts if t.strip()]
    if (text or file) and not reviews:
        raise UsageError("text= and file= hold no review to classify")
    return reviews


def progress(batches, desc, enabled=True):
    """batches, with a progress bar on standard error that disappears when they are done."""
    from tqdm.auto import tqdm
    return tqdm(batches, desc=desc, unit="batch", leave=False, disable=not enabled, file=sys.stderr)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


# -----------------------------------------------------------------------------
# a training run

def open_run(config, explicit, program="train.py", rank=0, world=1):
    """Hold out_dir and decide under the lock whether to continue its interrupted run or start
    afresh (under torchrun, process 0 holds it and writes; the others read). Returns a TrainingRun:
    its config is the run's (a resumed run's own, with the flags given now on top) and its resume
    the checkpoint to resume from, or None."""
    master = rank == 0
    run = TrainingRun(config.out_dir, program, create=master, lock=master)
    run.rank, run.world, run.master = rank, world, master
    try:
        run.config, run.resume = start_or_resume(config, explicit, run)
        check_config(run.config, run.resume)
    except BaseException:
        run.close()
        raise
    run.run_id = run.resume["run_id"] if run.resume else uuid.uuid4().hex[:12]
    run.base = run.resume["base"] if run.resume else None
    run.config.wandb_log = run.config.wandb_log or bool(wandb_key())  # printed and saved as it is in effect
    if master:
        print("".join(f"{k} = {v!r}\n" for k, v in vars(run.config).items()), end="")
        if run.resume and run.resume["iter_num"] == run.config.max_iters:
            print(f"{run.out_dir} holds this run finished at iteration {run.config.max_iters}: nothing to train")
        elif run.resume:
            print(f"resuming {run.out_dir} at iteration {run.resume['iter_num']} of {run.config.max_iters}")
    return run


def check_config(config, resume):
    """What the flags alone cannot say: settings that disagree, sources that are missing, a LoRA rank
    past the layers' width (before anything of that size is allocated)."""
    if config.n_embd % config.n_head:
        raise UsageError(f"n_embd={config.n_embd}: must be a multiple of n_head={config.n_head}")
    if not config.dataset.strip():
        raise UsageError("dataset is empty: name a hub dataset or a local directory")
    if config.init_from != "scratch":  # a missing directory, or an unreachable hub, is found out now
        with loading_weights("init_from", config.init_from):
            from transformers import GPT2Config
            width = GPT2Config.from_pretrained(config.init_from).n_embd if resume is None else config.lora_rank
        if config.lora_rank > width:
            raise UsageError(f"lora_rank={config.lora_rank}: must be at most {width}, the width of {config.init_from}'s layers")
    check_source("dataset", config.dataset)
    from dataloader import get_tokenizer
    get_tokenizer()  # its files are downloaded once: better to fail now than after loading data and model


def start_or_resume(config, explicit, run):
    """(config, checkpoint to resume from or None): continue out_dir's interrupted run where the
    flags ask for it; start afresh only where that destroys no earlier run."""
    if config.overwrite and (config.resume == "auto" or config.init_from == "resume"):
        raise UsageError("overwrite=true contradicts resume=auto and init_from=resume: give one of them")
    if config.init_from == "resume" or (config.resume == "auto" and os.path.isfile(run.path("ckpt_last.pt"))):
        return resume_config(config, explicit, run)
    if config.overwrite:
        return config, None
    holds_run = any(os.path.exists(run.path(f)) for f in RUN_FILES if f != "metrics.jsonl")
    if config.resume == "off" and holds_run:
        raise UsageError(f"out_dir={run.out_dir!r} holds an earlier run; continue it with resume=auto, "
                         "replace it with overwrite=true, or choose another out_dir")
    # a run killed before its first ckpt_last.pt (an iteration-0 ckpt.pt, perhaps evaluated) holds nothing a restart loses
    best = load_checkpoint(run.path("ckpt.pt")) if os.path.isfile(run.path("ckpt.pt")) else None
    evaluations = [read_json(run.path(f)) for f in ("results.json", "last_evaluation.json") if os.path.exists(run.path(f))]
    if (best and best["iter_num"] > 0) or any(best is None or not isinstance(e, dict) or e.get("run_id") != best["run_id"]
                                              for e in evaluations):
        raise UsageError(f"out_dir={run.out_dir!r} holds a run but no ckpt_last.pt to continue it from; nothing was "
                         "changed: replace the run with overwrite=true, or choose another out_dir")
    return config, None


def resume_config(config, explicit, run):
    """The interrupted run's config, with the flags given now on top; its architecture must match,
    and every run file in out_dir must be whole and of that run."""
    path = run.path("ckpt_last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"init_from=resume: no {path} to resume from; start the run with: python train.py "
                         f"out_dir={run.out_dir}")
    state = load_checkpoint(path)
    if not RESUME_KEYS <= set(state):
        raise CheckpointError(f"{path} is incomplete: it lacks {', '.join(sorted(RESUME_KEYS - set(state)))}")
    if len(state["rng"]) != run.world:
        raise UsageError(f"{path} was saved by {len(state['rng'])} processes and this is {run.world}; resume it with "
                         f"the same number (torchrun --nproc_per_node={len(state['rng'])}, or 1: python train.py)")
    best = run.path("ckpt.pt")
    if not os.path.isfile(best):
        raise CheckpointError(f"{path} has no {best} beside it; continue the run from a whole copy of its out_dir")
    best_state = load_checkpoint(best)
    same_run({path: state, best: best_state})  # files of two runs never continue as one
    results = read_results(run.path("results.json"))
    if results is not None and results.get("run_id") != state["run_id"]:
        raise CheckpointError(f"{run.path('results.json')} belongs to run {results.get('run_id')}, {path} to run "
                              f"{state['run_id']}; nothing was changed")
    if any(row.get("run") != state["run_id"] for row in read_metrics(run.path("metrics.jsonl"))):
        raise CheckpointError(f"{run.path('metrics.jsonl')} holds rows of another run than {path}'s "
                              f"({state['run_id']}); nothing was changed")
    saved = state["config"]
    for key in ARCHITECTURE:
        if key in explicit and getattr(config, key) != saved[key]:
            raise UsageError(f"{key}={getattr(config, key)!r} differs from the checkpoint's {key}={saved[key]!r} "
                             f"in {path}; drop the flag or use a new out_dir")
    merged = SimpleNamespace(**dict(saved, **{k: getattr(config, k) for k in set(explicit) | set(MACHINE) if k != "init_from"}))
    if best_state["iter_num"] > max(state["iter_num"], merged.max_iters):  # an extension killed between its writes
        raise UsageError(f"{best} is at iteration {best_state['iter_num']}, past {path}'s {state['iter_num']}: an extension "
                         f"to max_iters={best_state['config']['max_iters']} was interrupted; continue it with that max_iters")
    if state["iter_num"] > merged.max_iters:
        raise UsageError(f"out_dir={run.out_dir!r} holds a run at iteration {state['iter_num']}, past max_iters="
                         f"{merged.max_iters}; nothing was changed: give max_iters={state['iter_num']} or more to continue it")
    if "init_from" in explicit and config.init_from not in ("resume", saved["init_from"]):
        if state["base"] is None:
            raise UsageError(f"init_from={config.init_from!r} differs from the resumed run's init_from="
                             f"{saved['init_from']!r}, and that run trains every weight, so it continues from its "
                             "own; drop the flag or use a new out_dir")
        merged.init_from = config.init_from  # the same base weights found elsewhere (checked on load)
    return merged, state


class TrainingRun(Run):
    """The run train.py trains: its config, the checkpoint it resumes from, and what it writes."""
    config = resume = base = run_id = bar = wandb = None
    master, started, rows, t0, rank, world = True, False, (), 0.0, 0, 1

    def restore(self, optimizer, scaler, device):
        """(iter_num, best validation loss) to start from: a resumed run's, with its optimizer, loss
        scaler and random state; (0, inf) for a new run. The clock and the progress bar start now."""
        iter_num, best_val_loss = (self.resume["iter_num"], self.resume["best_val_loss"]) if self.resume else (0, math.inf)
        self.rows = [r for r in read_metrics(self.path("metrics.jsonl")) if r["iter"] <= iter_num] if self.resume else []
        self.t0 = time.time() - (self.rows[-1].get("elapsed", 0.0) if self.rows else 0.0)  # across sessions
        if self.master:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.config.max_iters, initial=iter_num, desc="train", unit="step", file=sys.stderr)
        if self.resume is None:
            return iter_num, best_val_loss
        asked = [{k: group[k] for k in ("lr", "betas", "weight_decay")} for group in optimizer.param_groups]
        optimizer.load_state_dict(self.resume["optimizer"])
        for group, hyperparameters in zip(optimizer.param_groups, asked):  # flags given now win over saved ones
            group.update(hyperparameters)
        scaler.load_state_dict(self.resume["scaler"])
        rng = self.resume["rng"][self.rank]  # each process's own
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], device)
        return iter_num, best_val_loss

    def save(self, name, model, iter_num, best_val_loss, optimizer=None, scaler=None, rng=None):
        """Write a checkpoint of model's trained tensors (only the master process writes). With the
        optimizer and loss scaler (ckpt_last.pt) it is a state to resume from, with rng the random
        state to resume with (default: now)."""
        if optimizer is not None:  # every process's random state, so that its dropout resumes exactly
            mine, rng = rng or rng_state(str(next(model.parameters()).device)), [None] * self.world
            if self.world > 1:
                import torch.distributed as dist
                dist.all_gather_object(rng, mine)
            else:
                rng[0] = mine
        if not self.master:
            return
        self._first_write()
        if model.config.lora_rank > 0 and self.base is None:
            self.base = dict(init_from=self.config.init_from, fingerprint=base_fingerprint(model))
        checkpoint = checkpoint_of(model, self.base, run_id=self.run_id, iter_num=iter_num, best_val_loss=best_val_loss,
                                   config=vars(self.config))
        if optimizer is not None:
            checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng)
        # a sum is finite only where every element is: 100x faster than torch.isfinite on some CPU builds
        if not all(torch.isfinite(t.sum(dtype=torch.float64)) for t in checkpoint["model"].values()):
            raise Diverged(f"the weights are not finite at iteration {iter_num}; checkpoints left as they were")
        save_checkpoint(self.path(name), checkpoint)

    def log(self, **row):
        """One row of metrics.jsonl (and wandb) with the time since the run began; a training row
        moves the progress bar, a validation row is printed."""
        if not self.master:
            return
        self._first_write()
        row.update(elapsed=round(time.time() - self.t0, 2), run=self.run_id)
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k not in ("iter", "run")}, step=row["iter"])
        if "val_loss" in row:
            self.bar.write(f"iter {row['iter']}: validation loss {row['val_loss']:.4f}")
            self.bar.start_t += row.get("val_time", 0)  # the bar's rate and ETA count training steps only
            self.bar.last_print_t += row.get("val_time", 0)
        else:
            self.bar.set_postfix(train_loss=f"{row['train_loss']:.4f}", tok_s=f"{row['tokens'] / row['step_time']:,.0f}",
                                 refresh=False)
            self.bar.update(row["iter"] - self.bar.n)

    def print(self, *args):
        if self.master:  # one process of a torchrun speaks
            print(*args)

    def close(self):
        if self.bar is not None:  # closed on an error too, so that it ends its line before the message
            self.bar.close()
        super().close()

    def finish(self, iter_num, best_val_loss):
        if not self.master:
            return
        self.bar.close()
        print(f"done: iteration {iter_num} of {self.config.max_iters}, {time.time() - self.t0:.1f} s in all; best "
              f"validation loss {best_val_loss:.4f}\ncheckpoints: {self.path('ckpt.pt')} (best), "
              f"{self.path('ckpt_last.pt')} (last); metrics.jsonl beside them")
        if self.wandb:
            self.wandb.finish()

    def check_sizes(self, model, loader, world=1):
        """What only the model and the data tell, before training: a step's reviews fit in the train
        split and divide among the processes, and (with eval_test) the test prompts fit the context
        beside generate.py's answer."""
        from dataloader import check_prompt_room
        c = self.config
        step = c.batch_size * c.gradient_accumulation_steps
        if step > len(loader.examples["train"]) or step % world:
            raise UsageError(f"batch_size x gradient_accumulation_steps = {step} reviews a step: more than the "
                             f"{len(loader.examples['train'])} of the train split, or not divisible by {world} processes")
        if c.eval_test:
            check_prompt_room(c.prompt_template, model.config.block_size, handout_answer_tokens())

    def test_accuracy(self, model, records, device, dtype):
        """The handout's accuracy lines for both checkpoints on the test split, as generate.py prints
        them by default, and results.json."""
        import generate
        c = self.config
        config, _ = parse_flags("generate.py", generate.FLAGS, [f"out_dir={c.out_dir}", f"dataset={c.dataset}", f"seed={c.seed}",
                                                                f"prompt_template={c.prompt_template}", f"batch_size={c.eval_batch_size}"])
        checkpoints = self.checkpoints(("best", "last"))
        self.trained_with = checkpoints[-1][1]["config"]  # only an evaluation on its own data is the run's result
        rows, sets = generate.evaluate(model, checkpoints, records, config, device, dtype)
        print(f"results: {self.write_results(rows, sets, config)} and its predictions")

    def tested(self):
        return is_tested(self.out_dir)

    def _first_write(self):
        """Before the first write: a new run removes an earlier run's files (now that every check has
        passed), a resumed one drops the metrics past its iteration; then logging starts."""
        if self.started:
            return
        self.started = True
        if self.resume is None:  # an earlier run's wandb files too
            shutil.rmtree(self.path("wandb"), ignore_errors=True)
        for name in RUN_FILES if self.resume is None else ():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(name))
        atomic_write(self.path("metrics.jsonl"), lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.rows).encode()))
        self.wandb = start_wandb(self.config)


def rng_state(device):
    """The random state: where dropout and data order draw from (to resume exactly)."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


# -----------------------------------------------------------------------------
# metrics

def read_metrics(path):
    """The rows of a metrics.jsonl; a line torn by a kill, or that is not a row of ours, is skipped."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    row = json.loads(line)
                    if isinstance(row, dict) and type(row.get("iter")) is int and all(
                            isinstance(v, (int, float)) for k, v in row.items() if k not in ("iter", "run")):
                        rows.append(row)
    return rows


def wandb_key():
    key = os.environ.get("WANDB_API_KEY", "")
    if not key and os.path.isfile(KEY_FILE):
        try:
            with open(KEY_FILE, encoding="utf-8") as f:
                key = json.load(f).get("wandb_api_key", "")
        except (OSError, ValueError, AttributeError):
            print("warning: wandb_api.json is unreadable; ignoring it", file=sys.stderr)
    return key


def start_wandb(config):
    """A wandb run when a key is configured or wandb_log is on, else None. Failure only warns."""
    key = wandb_key()
    if not (key or config.wandb_log):
        print(f"no wandb key: logging locally to {os.path.join(config.out_dir, 'metrics.jsonl')}")
        return None
    try:
        import wandb
        if key:
            os.environ["WANDB_API_KEY"] = key  # read by wandb itself; never printed or saved by us
        return wandb.init(project=config.wandb_project, dir=config.out_dir, config=vars(config),
                          name=config.wandb_run_name or os.path.basename(os.path.abspath(config.out_dir)))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        print(f"warning: wandb is unavailable ({type(e).__name__}: {reason}); logging locally only", file=sys.stderr)
        return None
