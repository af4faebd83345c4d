"""The prompting baselines of tools.report: which evaluations of the raw model it makes, and their table.

Each is `python generate.py method=logprob shots=K shot_seed=S calibrate=true` in
<results_dir>/prompting/kK_seedS: one evaluation gives the uncalibrated row and the calibrated one.
"""
import os
import statistics

from dataloader import check_demonstrations_fit, draw_demonstrations, load_rotten_tomatoes
from generate import read_results
from harness.flags import UsageError


def shot_counts(config):
    """The numbers of demonstrations in shots=."""
    counts = [k.strip() for k in config.shots.split(",") if k.strip()]
    if not all(k.isdigit() for k in counts):
        raise UsageError(f"shots={config.shots!r}: expected whole numbers >= 0, comma-separated")
    return sorted({int(k) for k in counts})


def check_fit(config, context):
    """Refuse, before the first command, demonstrations that leave no room for a test review."""
    counts = shot_counts(config)
    if counts:
        splits = load_rotten_tomatoes(config.dataset)
        for seed in range(config.shot_seeds):  # the most shots, with each seed's demonstrations
            ids = draw_demonstrations(splits, max(counts), seed)
            check_demonstrations_fit([splits["train"][i] for i in ids], splits["test"], "default", context, 0)


def seeds(config, shots):
    """The demonstration sets drawn for a number of shots: shot_seeds of them, one for none."""
    return range(config.shot_seeds if shots else 1)


def cases(config):
    """(shots, seed) of each evaluation."""
    return [(shots, seed) for shots in shot_counts(config) for seed in seeds(config, shots)]


def directory(config, shots, seed):
    return os.path.join(config.results_dir, "prompting", f"k{shots}_seed{seed}")


def argv(config, shots, seed):
    """generate.py's flags for one evaluation."""
    return [f"out_dir={directory(config, shots, seed)}", f"init_from={config.init_from}",
            f"dataset={config.dataset}", f"device={config.device}", "method=logprob", f"shots={shots}",
            f"shot_seed={seed}", "calibrate=true"]


def row(config, shots, seed, calibrate):
    """The logprob test accuracy of init_from with these demonstrations (calibrated or not), if measured."""
    wanted = dict(init_from=config.init_from, dataset=config.dataset, num_examples=0, shots=shots,
                  shot_seed=seed if shots else 0, calibrate=True)
    results = read_results(os.path.join(directory(config, shots, seed), "last_evaluation.json"))
    for found in results["results"] if results and results["split"] == "test" else []:
        if ((found["method"], found["parse"]) == ("logprob", "calibrated" if calibrate else None)
                and all(found["settings"].get(k) == v for k, v in wanted.items())):
            return found
    return None


def is_done(config, shots, seed):
    return all(row(config, shots, seed, calibrate) for calibrate in (False, True))


def table(config):
    """The prompting rows: mean ± sample std over the demonstration sets (report.py adds the fine-tuned
    runs beneath)."""
    lines = ["## Prompting against fine-tuning", "",
             f"Prompting: {config.init_from}'s likelier label word (method=logprob); mean ± standard "
             "deviation over the demonstration sets drawn. Fine-tuned: the Best Val Checkpoint's generated "
             "answers.", "", "| method | test accuracy | evaluations |", "|---|---|---|"]
    for shots in shot_counts(config):
        for calibrate in (False, True):
            rows = [row(config, shots, seed, calibrate) for seed in seeds(config, shots)]
            name = (f"{shots}-shot" if shots else "zero-shot") + (", calibrated" if calibrate else "")
            accuracies = [r["accuracy"] for r in rows if r]
            spread = f" ± {statistics.stdev(accuracies):.4f}" if len(accuracies) > 1 else ""
            shown = f"{statistics.mean(accuracies):.4f}{spread}" if accuracies else "not run yet"
            lines.append(f"| {name} | {shown} | {len(accuracies)} of {len(rows)} |")
    return lines
