"""Each fine-tuning method learns, shown without pretrained weights: a small GPT trained from scratch on
the real reviews stands in for GPT-2, then each method adapts it to the same reviews with every label
swapped, so that it must answer the other label word.

    python -m tools.methods_proxy                                    # about 10 minutes on a 2-core CPU
    python -m tools.methods_proxy base_steps=4 steps=2 results_dir=/tmp/proxy   # checks that it runs

The base, right about 73% of the time on the real labels, is right about 27% of the time on the swapped
ones: a method that learns must climb far above chance. Every command resumes where it stopped. Writes
results_dir/methods_proxy.md.
"""
import json
import os
import subprocess
import sys

import torch

from dataloader import load_rotten_tomatoes
from finetune import apply_method
from generate import read_results
from harness.checkpoints import load_checkpoint
from harness.flags import parse_flags
from harness.run import read_metrics
from model import GPT, GPTConfig, count_parameters

FLAGS = {
    "results_dir": ("methods_proxy", "where the base, the swapped data and each method's run go"),
    "dataset": ("rotten_tomatoes", "hub dataset name or local directory"),
    "base_steps": (600, "steps of the base trained from scratch", "> 0"),
    "steps": (300, "steps of each method on the swapped labels", "> 0"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
}
BASE = "init_from=scratch n_layer=4 n_head=4 n_embd=128 block_size=128 learning_rate=2e-3"
METHODS = {  # name: train.py flags, each at a learning rate that suits a model this small
    "LoRA r=8": "lora_rank=8 lora_alpha=32 learning_rate=2e-3",
    "BitFit": "method=bitfit learning_rate=1e-2",
    "adapters, size 16": "method=adapter adapter_size=16 learning_rate=2e-3",
    "prefix tuning, 16 vectors": "method=prefix prefix_length=16 learning_rate=1e-1",  # 1e-2 stayed at chance
    "full fine-tuning": "lora_rank=0 learning_rate=1e-3",
}
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *flags):
    cmd = [sys.executable, *script.split(), *flags]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=HERE, check=True)


def accuracy(out_dir, checkpoint):
    results = read_results(os.path.join(out_dir, "results.json"))
    return next(r["accuracy"] for r in results["results"] if r["checkpoint"] == checkpoint
                and (r["method"], r["parse"]) == ("generate", "near_start"))


def main(argv):
    config, _ = parse_flags("methods_proxy.py", FLAGS, argv, __doc__)
    out = os.path.abspath(config.results_dir)
    common = [f"device={config.device}", "batch_size=32", "gradient_accumulation_steps=1", "resume=auto",
              "wandb_log=false"]
    run("train.py", *BASE.split(), *common, f"dataset={config.dataset}", f"out_dir={out}/base",
        f"max_iters={config.base_steps}", f"eval_interval={max(1, config.base_steps // 6)}",
        "eval_test=false")
    if not os.path.isdir(f"{out}/base_hf"):
        run("-m tools.export", f"out_dir={out}/base", "format=hf", f"dest={out}/base_hf")
    os.makedirs(f"{out}/swapped", exist_ok=True)
    for split, records in load_rotten_tomatoes(config.dataset).items():
        with open(f"{out}/swapped/{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dict(r, label=1 - r["label"])) + "\n" for r in records)
    swapped = [f"init_from={out}/base_hf", f"dataset={out}/swapped"]
    if read_results(f"{out}/base_swapped/results.json") is None:
        run("generate.py", *swapped, f"out_dir={out}/base_swapped", f"device={config.device}")
    lines = ["| method | trainable parameters | test accuracy, Best Val | Last Iter | train time |",
             "|---|---|---|---|---|",
             f"| the base, untrained on the swapped labels | 0 | "
             f"{accuracy(f'{out}/base_swapped', 'Zero-shot ' + f'{out}/base_hf'):.4f} | | |"]
    for name, flags in METHODS.items():
        out_dir = f"{out}/{name.split(',')[0].replace(' ', '_').replace('=', '')}"
        run("train.py", *swapped, *flags.split(), *common, f"out_dir={out_dir}", f"max_iters={config.steps}",
            f"eval_interval={max(1, config.steps // 6)}")
        checkpoint = load_checkpoint(f"{out_dir}/ckpt.pt")
        with torch.device("meta"):
            trainable, total = count_parameters(apply_method(GPT(GPTConfig(**checkpoint["model_args"]))))
        minutes = read_metrics(f"{out_dir}/metrics.jsonl")[-1]["elapsed"] / 60
        best, last = (accuracy(out_dir, f"{which} Checkpoint") for which in ("Best Val", "Last Iter"))
        lines.append(f"| {name} | {trainable:,} of {total:,} | {best:.4f} | {last:.4f} | {minutes:.1f} min |")
    with open(f"{out}/methods_proxy.md", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
