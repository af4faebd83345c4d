"""Reproduce the homework's experiments and write its tables and plots.

    python -m tools.report                                  # the whole grid on gpt2-medium (GPU advised)
    python -m tools.report runs=r16_a64,full max_iters=20   # a subset, shorter
    python -m tools.report init_from=gpt2 device=cpu max_iters=2 extra="batch_size=8"
    python -m tools.report submission [PATH]                # submission.zip: the code to upload, the notebook

Each run is `python train.py <its flags> out_dir=<results_dir>/<run> resume=auto ...`: a finished
run (its results.json holds both checkpoints' test accuracy) is skipped and an interrupted one
resumes, but only where its settings are the ones asked for now; a run with other settings stops
report.py unless overwrite=true replaces it. The prompting baselines (shots= demonstrations per review, each
drawn shot_seeds times) are evaluations of init_from with generate.py calibrate=true (a row without and
one with contextual calibration), skipped where done. Then it writes results.md (the tables), val_loss.png
and val_loss_alpha.png (validation loss against iteration) and val_loss.json (the plotted numbers)
into results_dir.
"""
import ast
import contextlib
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import zipfile

import torch

import train
from dataloader import DataError
from finetune import other_methods_settings
from generate import is_tested, read_results
from harness.checkpoints import atomic_write, load_checkpoint, loading_weights
from harness.device import device_and_dtype
from harness.flags import UsageError, fail, parse, parse_flags, reported_errors
from harness.run import BEFORE_METHODS, check_out_dir, read_metrics
from finetune import apply_method
from model import GPT, GPTConfig, count_parameters
from tools import prompting

RUNS = {  # name: (label in the tables and plots, train.py flags beside its defaults)
    "r16_a64": ("LoRA r=16, alpha=64", "lora_rank=16 lora_alpha=64"),
    "r128_a512": ("LoRA r=128, alpha=512", "lora_rank=128 lora_alpha=512"),
    "r196_a784": ("LoRA r=196, alpha=784", "lora_rank=196 lora_alpha=784"),
    "full": ("Full fine-tuning (dropout 0.05)", "lora_rank=0 dropout=0.05"),
    "r16_a256": ("LoRA r=16, alpha=256", "lora_rank=16 lora_alpha=256"),
    "r128_a512_question": ("LoRA r=128, alpha=512, 'question' prompt",
                           "lora_rank=128 lora_alpha=512 prompt_template=question"),
    # the methods at budgets near LoRA r=16's 2.36 M parameters (BitFit has only its biases), each at a
    # learning rate from its paper's range; LoRA r=16 and full fine-tuning are the grid's runs above
    "bitfit": ("BitFit (every bias)", "method=bitfit learning_rate=1e-3"),
    "adapter24": ("Adapters, size 24", "method=adapter adapter_size=24 learning_rate=1e-3"),
    "prefix48": ("Prefix tuning, 48 vectors", "method=prefix prefix_length=48 learning_rate=1e-2"),
}
GRIDS = {"all": ["r16_a64", "r128_a512", "r196_a784", "full", "r16_a256", "r128_a512_question"],
         "methods": ["r16_a64", "adapter24", "prefix48", "bitfit", "full"]}
LABELS = {run: label for run, (label, _) in RUNS.items()}
TABLES = [
    ("Test accuracy across ranks, alpha = 4r (5.4)", ["r16_a64", "r128_a512", "r196_a784", "full"]),
    ("A larger alpha at rank 16 (5.8)", ["r16_a64", "r16_a256", "full"]),
    ("Prompt templates, r=128, alpha=512 (5.12)", ["r128_a512", "r128_a512_question"]),
]
PLOTS = {"val_loss.png": ("Validation loss across ranks, alpha = 4r", TABLES[0][1]),
         "val_loss_alpha.png": ("Validation loss: alpha at rank 16", TABLES[1][1]),
         "val_loss_methods.png": ("Validation loss: fine-tuning methods", GRIDS["methods"])}
FLAGS = {
    "results_dir": ("results", "one directory per run goes here, and the tables and plots"),
    "runs": ("all", f"all (the handout's grid), methods (LoRA, adapters, prefix tuning, BitFit, full "
                    f"fine-tuning) or comma-separated runs: {', '.join(RUNS)}"),
    "init_from": ("gpt2-medium", "the pretrained model for every run"),
    "max_iters": (0, "optimizer steps per run; 0 = train.py's default"),
    "dataset": ("rotten_tomatoes", "hub dataset name or local directory"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "zero_shot": (True, "also the zero-shot accuracy of init_from"),
    "shots": ("0,4,8", "prompting baselines (method=logprob, with and without calibration): demonstrations "
                       "per review, comma-separated; empty = none"),
    "shot_seeds": (5, "demonstration sets drawn per number of shots (0 shots: one)", "> 0"),
    "extra": ("", "more train.py flags for every run, space-separated"),
    "overwrite": (False, "replace a run whose settings differ from the ones asked for now (else it stops)"),
}
# train.py flags that do not change a run's result: a run made with other values of these is reused
NOT_COMPARED = {"out_dir", "resume", "overwrite", "eval_test", "device", "compile", "debug", "ckpt_interval",
                "eval_batch_size", "wandb_log", "wandb_project", "wandb_run_name"}


def run_state(out_dir):
    """The run in out_dir (its id, config, model_args, iteration), or None; its tensors are mapped
    from the file, not read."""
    for name in ("ckpt_last.pt", "ckpt.pt"):
        if os.path.isfile(os.path.join(out_dir, name)):
            return load_checkpoint(os.path.join(out_dir, name), mmap=True)
    return None


def is_finished(out_dir, state):
    """The run has reached its max_iters, and results.json holds both its checkpoints' test accuracy."""
    return state["iter_num"] == state["config"]["max_iters"] and is_tested(out_dir)


def first_difference(saved, train_argv):
    """(flag, saved value, value asked for now) of the first result-changing difference, or None."""
    asked, saved = vars(parse_flags("report.py", train.FLAGS, train_argv)[0]), dict(BEFORE_METHODS, **saved)
    ignored = (NOT_COMPARED | (set(train.SIZES) if asked["init_from"] != "scratch" else set())  # the model's
               | other_methods_settings(asked["method"]))
    return next(((k, saved.get(k), asked[k]) for k in train.FLAGS
                 if k not in ignored and saved.get(k) != asked[k]), None)


def end_with_parent():
    """Linux: have the kernel kill this process when its parent dies (elsewhere: nothing)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def run_command(cmd):
    """Run one command of the grid (a killed report.py takes it along); one that stops, stops report.py."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    status = subprocess.run(cmd, preexec_fn=end_with_parent).returncode
    if status == 2:  # a usage error: the command has said what to change, in one line
        sys.exit(2)
    if status:
        fail("report.py", f"{os.path.basename(cmd[1])} stopped (exit status {status}); rerun report.py to "
                          "continue where it stopped", 1)


def zero_shot_row(config):
    """The zero-shot test accuracy of init_from on dataset, if it has been measured."""
    results = read_results(os.path.join(config.results_dir, "zero_shot", "results.json"))
    return next((r for r in (results["results"] if results else []) if r["checkpoint"] ==
                 f"Zero-shot {config.init_from}" and (r["method"], r["parse"]) == ("generate", "near_start")
                 and r["settings"]["dataset"] == config.dataset), None)


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's top level
# what report.py decides for every run: extra= may not change it, nor what the run itself sets
DECIDED = {"out_dir", "resume", "overwrite", "eval_test", "init_from", "dataset", "device", "max_iters"}


def extra_flags(config, run):
    """extra= as train.py reads it ({flag: value}), refused where it changes what report.py or the run
    decides."""
    try:
        values, given = parse(train.FLAGS, shlex.split(config.extra))
    except (ValueError, UsageError) as e:
        raise UsageError(f"extra={config.extra!r}: {e}") from None
    decided = given & (DECIDED | {flag.partition("=")[0] for flag in RUNS[run][1].split()})
    if decided:
        raise UsageError(f"extra={config.extra!r}: {', '.join(sorted(decided))}: report.py or the grid's "
                         "runs set these (results_dir=, runs=, init_from=, dataset=, device=, max_iters=)")
    return {key: getattr(values, key) for key in given}


def train_argv(config, run):
    """train.py's flags for one run of the grid: the run's own, report.py's, then extra."""
    flags = dict(f.split("=", 1) for f in RUNS[run][1].split())
    flags.update(out_dir=os.path.join(config.results_dir, run), resume="auto", eval_test="true",
                 init_from=config.init_from, dataset=config.dataset, device=config.device,
                 **extra_flags(config, run))
    if config.max_iters:
        flags["max_iters"] = config.max_iters
    return [f"{key}={value}" for key, value in flags.items()]


def check_grid(config, names):
    """What the flags tell before the first command: the device, results_dir, runs made there with other
    settings, init_from, every run's rank and the most demonstrations fit, so that a grid never stops on
    them halfway."""
    flags = {run: parse_flags("report.py", train.FLAGS, train_argv(config, run))[0] for run in names}
    ranks = {run: f.lora_rank if f.method == "lora" else 0 for run, f in flags.items()}
    device_and_dtype(config.device, "auto")
    check_out_dir(config.results_dir, "results_dir")
    for run in names if not config.overwrite else ():
        out_dir = os.path.join(config.results_dir, run)
        state = run_state(out_dir)
        difference = state and first_difference(state["config"], train_argv(config, run))
        if difference:
            raise UsageError(f"{out_dir} holds a run with other settings ({difference[0]}={difference[1]!r} "
                             f"there, {difference[2]!r} asked for now); replace it with overwrite=true, or "
                             "choose another results_dir")
    if config.init_from == "scratch" and prompting.shot_counts(config):
        raise UsageError("shots= prompts a pretrained model, which init_from=scratch is not: give shots=")
    lora = next((run for run, rank in ranks.items() if rank and config.init_from == "scratch"), None)
    if lora:
        raise UsageError(f"runs={lora}: LoRA adapts a pretrained model, which init_from=scratch is not; "
                         "choose runs=full or another init_from")
    if config.init_from == "scratch":
        return
    with loading_weights("init_from", config.init_from):
        from transformers import GPT2Config
        model = GPT2Config.from_pretrained(config.init_from)
    width = model.n_embd
    for run, rank in ranks.items():
        if rank > width:
            raise UsageError(f"runs={run}: lora_rank={rank} is more than the {width}-wide layers of "
                             f"{config.init_from}; choose other runs or another init_from")
    prompting.check_fit(config, model.n_positions)


def run_grid(config, names):
    if config.zero_shot:
        out_dir = os.path.join(config.results_dir, "zero_shot")
        if zero_shot_row(config):
            print(f"zero-shot: done already ({out_dir})")
        else:
            run_command([sys.executable, os.path.join(HERE, "generate.py"), f"out_dir={out_dir}",
                         f"init_from={config.init_from}", f"dataset={config.dataset}",
                         f"device={config.device}"])
    for run in names:
        out_dir = os.path.join(config.results_dir, run)
        argv = train_argv(config, run)
        state = run_state(out_dir)
        if state and first_difference(state["config"], argv):  # overwrite=true (check_grid refuses without)
            argv = [f for f in argv if not f.startswith("resume=")] + ["overwrite=true"]
        elif state and is_finished(out_dir, state):
            print(f"{run}: done already ({out_dir})")
            continue
        run_command([sys.executable, os.path.join(HERE, "train.py"), *argv])
    for shots, seed in prompting.cases(config):
        if prompting.is_done(config, shots, seed):
            print(f"prompting {os.path.basename(prompting.directory(config, shots, seed))}: done already")
        else:
            run_command([sys.executable, os.path.join(HERE, "generate.py"),
                         *prompting.argv(config, shots, seed)])


def run_summary(out_dir, checkpoint):
    """The numbers of one finished run for the tables."""
    with torch.device("meta"):  # counts parameters without building weights
        model = apply_method(GPT(GPTConfig(**checkpoint["model_args"])))
    trainable, total = count_parameters(model)
    results = read_results(os.path.join(out_dir, "results.json"))
    by_name = {r["checkpoint"]: r for r in results["results"]
               if (r["method"], r["parse"]) == ("generate", "near_start")}
    # rows past the run's iteration are an abandoned extension's
    metrics = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))
               if r["iter"] <= checkpoint["iter_num"]]
    best = by_name["Best Val Checkpoint"]
    return dict(rank=model.config.lora_rank, alpha=model.config.lora_alpha, best=best, config=model.config,
                megabytes=os.path.getsize(os.path.join(out_dir, "ckpt.pt")) / 1e6,
                last=by_name["Last Iter Checkpoint"], trainable=trainable, total=total,
                seconds=metrics[-1]["elapsed"] if metrics else None, device=best["settings"]["device"],
                iters=checkpoint["iter_num"])


def table(names, summaries):
    lines = ["| run | r | alpha | test acc. (Best Val) | test acc. (Last Iter) | unparseable (best / last) "
             "| trainable parameters | steps | train time | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in names:
        s = summaries.get(run)
        if s is None:
            lines.append(f"| {LABELS[run]} | not run yet | | | | | | | | |")
            continue
        alpha = f"{s['alpha']:g}" if s["rank"] else "-"
        time_text = f"{s['seconds'] / 60:.1f} min" if s["seconds"] is not None else "?"
        lines.append(f"| {LABELS[run]} | {s['rank']} | {alpha} | {s['best']['accuracy']:.4f} | "
                     f"{s['last']['accuracy']:.4f} "
                     f"| {s['best']['unparseable']} / {s['last']['unparseable']} "
                     f"| {s['trainable']:,} of {s['total']:,} ({100 * s['trainable'] / s['total']:.2f}%) "
                     f"| {s['iters']} | {time_text} | {s['device']} |")
    return lines


def methods_table(summaries):
    """The fine-tuning methods side by side: what each trains, its checkpoint, time and test accuracy."""
    lines = ["## Fine-tuning methods at similar budgets", "",
             "| run | method | trainable parameters | ckpt.pt | train time | test acc. (Best Val) | "
             "test acc. (Last Iter) |", "|---|---|---|---|---|---|---|"]
    for run in GRIDS["methods"]:
        s = summaries.get(run)
        if s is None:
            lines.append(f"| {LABELS[run]} | not run yet | | | | | |")
            continue
        c, time_text = s["config"], f"{s['seconds'] / 60:.1f} min" if s["seconds"] is not None else "?"
        method = "full" if c.method == "lora" and not c.lora_rank else c.method
        share = 100 * s["trainable"] / s["total"]
        lines.append(f"| {LABELS[run]} | {method} | {s['trainable']:,} ({share:.2f}%) | "
                     f"{s['megabytes']:.1f} MB | {time_text} | {s['best']['accuracy']:.4f} | "
                     f"{s['last']['accuracy']:.4f} |")
    return lines + [""]


def write_markdown(config, summaries):
    lines = [f"# Results: {config.init_from}", ""]
    zero = zero_shot_row(config)
    if zero:
        lines += ["## Zero-shot (5.3)", "", "| model | test accuracy | unparseable | device |",
                  "|---|---|---|---|",
                  f"| {config.init_from} | {zero['accuracy']:.4f} | {zero['unparseable']} | "
                  f"{zero['settings']['device']} |", ""]
    for title, names in TABLES:
        lines += [f"## {title}", "", *table(names, summaries), ""]
    lines += methods_table(summaries)
    if prompting.shot_counts(config):
        fine_tuned = [f"| {LABELS[run]} (fine-tuned) | {s['best']['accuracy']:.4f} | 1 |"
                      for run, s in summaries.items()]
        lines += [*prompting.table(config), *fine_tuned, ""]
    path = os.path.join(config.results_dir, "results.md")
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path


def write_plots(results_dir, summaries):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for run in summaries:
        rows = read_metrics(os.path.join(results_dir, run, "metrics.jsonl"))
        series[run] = [[r["iter"], r["val_loss"]] for r in rows
                       if "val_loss" in r and r["iter"] <= summaries[run]["iters"]]
    for filename, (title, names) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
        for run in names:
            if run in series:
                ax.plot(*zip(*series[run]), marker="o", markersize=3, label=LABELS[run])
        ax.set(xlabel="iteration", ylabel="validation loss (answer tokens)", title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        atomic_write(os.path.join(results_dir, filename), lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
    data = {filename: {LABELS[r]: series[r] for r in names if r in series}
            for filename, (_, names) in PLOTS.items()}
    atomic_write(os.path.join(results_dir, "val_loss.json"),
                 lambda f: f.write(json.dumps(data, indent=1).encode()))


GRADED = ("lora.py", "model.py", "dataloader.py", "train.py", "generate.py")


def submission_files():
    """The graded files, every file of ours they and report.py import (the harness), the notebook and
    requirements; never a key, a checkpoint or a dataset."""
    needed, todo = set(), [*GRADED, "tools/report.py"]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        modules = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        for n in ast.walk(tree):  # from package import module: the module's file too
            if isinstance(n, ast.ImportFrom) and n.module:
                modules += [n.module] + [f"{n.module}.{a.name}" for a in n.names]
        for path in [m.replace(".", "/") + ".py" for m in modules] + [os.path.dirname(name) + "/__init__.py"]:
            todo += [path.lstrip("/")] if os.path.isfile(os.path.join(HERE, path.lstrip("/"))) else []
    return sorted(needed) + ["requirements.txt", "run_in_colab.ipynb"]


def write_submission(path="submission.zip"):
    files = submission_files()

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for name in files:
                z.write(os.path.join(HERE, name), name)
    atomic_write(path, write)
    print(f"wrote {path}: {' '.join(files)}\nthe graded files are {' '.join(GRADED)}; the other .py files "
          "are what they import, so upload them too wherever the scripts are run")


def main(argv):
    if argv[:1] == ["submission"] and len(argv) <= 2:
        with reported_errors("report.py"):
            return write_submission(*argv[1:])
    config, _ = parse_flags("report.py", FLAGS, argv, __doc__)
    names = GRIDS.get(config.runs) or [r.strip() for r in config.runs.split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNS]
    if unknown or not names:
        fail("report.py", f"runs={config.runs!r}: expected all, methods or a comma-separated list of "
                          f"{', '.join(RUNS)}")
    with reported_errors("report.py", also=(DataError,)):
        check_grid(config, names)
        run_grid(config, names)
        summaries = {}
        for run in RUNS:  # the finished runs made with the settings asked for now
            out_dir = os.path.join(config.results_dir, run)
            state = run_state(out_dir)
            with contextlib.suppress(UsageError):  # (one whose own flags extra= would change is not)
                if state and is_finished(out_dir, state) and not first_difference(state["config"],
                                                                                  train_argv(config, run)):
                    summaries[run] = run_summary(out_dir, state)
        path = write_markdown(config, summaries)
        write_plots(config.results_dir, summaries)
    print(f"wrote {path}, {', '.join(PLOTS)} and val_loss.json")


if __name__ == "__main__":
    main(sys.argv[1:])
