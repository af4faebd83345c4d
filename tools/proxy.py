"""Shows that each fine-tuning method learns, with no pretrained weights at all.

    python -m tools.proxy dataset=$ROTTEN_TOMATOES_DIR results_dir=/tmp/proxy    # ~10 minutes on 2 CPU cores
    python -m tools.proxy base_steps=4 steps=2 results_dir=/tmp/proxy_check     # checks that it runs

A small GPT trained from scratch on the real reviews (README's "Try it in minutes", ~73% right) stands in
for pretrained GPT-2. The task then changes: the same reviews with every label flipped, which the base
gets right only ~27% of the time. Each method (LoRA, BitFit, adapters, prefix tuning, full fine-tuning)
trains from the base on the flipped labels; one that learns climbs far above chance (50%). Writes
results_dir/proxy.md: each method's trainable parameters, test accuracy on the flipped labels and time.
A rerun skips the work already done and resumes an interrupted run.
"""
import json
import os
import subprocess
import sys

import torch

from dataloader import load_rotten_tomatoes
from finetune import apply_method
from generate import is_tested, read_results
from harness.checkpoints import load_checkpoint
from harness.flags import fail, parse_flags
from harness.run import read_metrics
from model import GPT, GPTConfig, count_parameters

FLAGS = {
    "results_dir": ("proxy", "the base, the flipped splits, each method's run and proxy.md go here"),
    "dataset": ("rotten_tomatoes", "hub dataset name or local directory with train/validation/test.jsonl"),
    "base_steps": (600, "steps of the base trained from scratch", "> 0"),
    "steps": (200, "steps of each method on the flipped labels", "> 0"),
    "device": ("cpu", "cpu, auto, cuda, cuda:N or mps"),
}
BASE = "init_from=scratch n_layer=4 n_head=4 n_embd=128 block_size=128 learning_rate=2e-3 eval_interval=100"
METHODS = {  # out_dir: train.py flags; a learning rate that works for a model this small
    "lora": "lora_rank=8 lora_alpha=32 learning_rate=2e-3",
    "bitfit": "method=bitfit learning_rate=2e-3",
    "adapter": "method=adapter adapter_size=16 learning_rate=2e-3",
    "prefix": "method=prefix prefix_length=8 learning_rate=1e-1",
    "full": "lora_rank=0 learning_rate=2e-3",
}
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's top level


def run(*cmd):
    print("$ " + " ".join(cmd), flush=True)
    status = subprocess.run([sys.executable, *cmd], cwd=HERE).returncode
    if status:
        fail("proxy.py", f"{cmd[-1] if cmd[0] == '-m' else cmd[0]} stopped (exit status {status}); "
                         "rerun proxy.py to continue", status)


def accuracy(out_dir, checkpoint=None):
    """Test accuracy (greedy generation, read near the start) of checkpoint (None: the only one)."""
    rows = read_results(os.path.join(out_dir, "results.json"))["results"]
    return next(r["accuracy"] for r in rows if checkpoint in (None, r["checkpoint"])
                and (r["method"], r["parse"]) == ("generate", "near_start"))


def trainable(out_dir):
    """(trainable, total) parameters of the run's model, built on the meta device (no memory)."""
    args = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), mmap=True)["model_args"]
    with torch.device("meta"):
        return count_parameters(apply_method(GPT(GPTConfig(**args))))


def main(argv):
    config, _ = parse_flags("proxy.py", FLAGS, argv, __doc__)
    out = os.path.abspath(config.results_dir)
    common = [f"device={config.device}", "batch_size=32", "gradient_accumulation_steps=1", "resume=auto",
              "wandb_log=false"]
    # 1. the base: a small GPT from scratch on the real labels, exported as a Hugging Face GPT-2
    if not is_tested(f"{out}/base"):
        run("train.py", *BASE.split(), *common, f"dataset={config.dataset}", f"out_dir={out}/base",
            f"max_iters={config.base_steps}")
    if not os.path.isfile(f"{out}/base_hf/config.json"):
        run("-m", "tools.export", f"out_dir={out}/base", "format=hf", f"dest={out}/base_hf")
    # 2. the changed task: every label flipped
    os.makedirs(f"{out}/flipped", exist_ok=True)
    for split, records in load_rotten_tomatoes(config.dataset).items():
        with open(f"{out}/flipped/{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": r["text"], "label": 1 - r["label"]}) + "\n" for r in records)
    flipped = [f"init_from={out}/base_hf", f"dataset={out}/flipped"]
    if read_results(f"{out}/base_eval/results.json") is None:
        run("generate.py", *flipped, f"out_dir={out}/base_eval", f"device={config.device}")
    # 3. each method adapts the base to the flipped labels
    lines = [f"Base: {accuracy(f'{out}/base', 'Best Val Checkpoint'):.4f} test accuracy on the real labels. "
             f"Test accuracy on the flipped labels ({config.steps} steps of 32 reviews):", "",
             "| method | trainable parameters | Best Val | Last Iter | train time |", "|---|---|---|---|---|",
             f"| base, zero-shot | 0 | {accuracy(f'{out}/base_eval'):.4f} | | |"]
    for name, flags in METHODS.items():
        out_dir = f"{out}/{name}"
        if not is_tested(out_dir):
            run("train.py", *flipped, *flags.split(), *common, f"out_dir={out_dir}",
                f"max_iters={config.steps}", "eval_interval=50")
        n, total = trainable(out_dir)
        minutes = read_metrics(f"{out_dir}/metrics.jsonl")[-1]["elapsed"] / 60
        best, last = (accuracy(out_dir, f"{which} Checkpoint") for which in ("Best Val", "Last Iter"))
        lines.append(f"| {name} ({flags}) | {n:,} of {total:,} | {best:.4f} | {last:.4f} | {minutes:.1f} min |")
    with open(f"{out}/proxy.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
