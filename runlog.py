"""What a training run logs: metrics.jsonl in out_dir always, and wandb when a key is configured."""
import json
import os
import sys

from checkpoint import atomic_write

KEY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wandb_api.json")


def read_metrics(path):
    """The rows of a metrics.jsonl; a line torn by a kill, or that is not a row of ours, is skipped."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and type(row.get("iter")) is int:
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


class RunLog:
    """One row per event, each with its iteration. On resume, rows past the resumed iteration
    (and a torn last line) are dropped, so the log reads as one uninterrupted run."""

    def __init__(self, config, resume_iter=None):
        self.path = os.path.join(config.out_dir, "metrics.jsonl")
        rows = [] if resume_iter is None else [r for r in read_metrics(self.path) if r["iter"] <= resume_iter]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
        self.elapsed_before = rows[-1].get("elapsed", 0.0) if rows else 0.0  # seconds spent by earlier sessions
        self.wandb = start_wandb(config)

    def log(self, **row):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb:
            self.wandb.log({k: v for k, v in row.items() if k != "iter"}, step=row["iter"])

    def finish(self):
        if self.wandb:
            self.wandb.finish()
