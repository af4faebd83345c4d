"""Fine-tune GPT-2 on Rotten Tomatoes reviews: LoRA on q, k, v (lora_rank > 0) or full fine-tuning.

    python train.py                                        # gpt2-medium, LoRA r=128, alpha=512
    python train.py rank=16 alpha=64 out_dir=runs/r16_a64  # one row of the handout's table
    python train.py init_from=resume out_dir=runs/r16_a64  # continue an interrupted run
    torchrun --nproc_per_node=2 train.py ...               # data parallel over 2 processes

Writes to out_dir: ckpt.pt (best validation loss), ckpt_last.pt (last iteration), resume.pt
(the latest state, to continue after an interruption), metrics.jsonl, and at the end the test
accuracy of both checkpoints (results.json, predictions.json).
"""
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from configurator import UsageError, autocast, device_name, fail, parse_flags, resolve_device, resolve_dtype
from dataloader import PROMPT_TEMPLATES, CustomDataLoader, DataError, load_rotten_tomatoes
from lora import mark_only_lora_as_trainable
from checkpoint import (CheckpointError, base_fingerprint, load_checkpoint, load_model, load_trained, make_checkpoint,
                        save_checkpoint)
from model import GPT, IGNORE_INDEX, GPTConfig, describe_parameters
from runlog import RunLog

FLAGS = {
    "out_dir": ("out", "directory for checkpoints, metrics.jsonl and results"),
    "resume": ("off", "auto: continue out_dir's interrupted run if there is one, else start it; off: always start afresh"),
    "overwrite": (False, "start afresh even where out_dir holds an earlier run (its checkpoints are replaced)"),
    "init_from": ("gpt2-medium", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub id or local Hugging Face GPT-2 directory; 'resume' continues out_dir; 'scratch' trains every weight of a small random model (sized by n_layer, n_head, n_embd, block_size)"),
    "dataset": ("rotten_tomatoes", "hub dataset name, or a local directory with train/validation/test.jsonl"),
    "prompt_template": ("default", f"instruction template: {', '.join(PROMPT_TEMPLATES)}"),
    "mask_prompt": (True, "loss on the answer tokens only; false: on the whole sequence"),
    "lora_rank": (128, "LoRA rank on the q, k, v projections; 0 = full fine-tuning"),
    "lora_alpha": (512.0, "LoRA alpha: the update is scaled by alpha / rank"),
    "lora_dropout": (0.05, "dropout on the input of the LoRA branch"),
    "dropout": (0.0, "dropout inside the transformer"),
    "learning_rate": (2.5e-4, "AdamW learning rate, constant"),
    "max_iters": (80, "optimizer steps"),
    "batch_size": (32, "examples per micro-batch (per process)"),
    "gradient_accumulation_steps": (4, "micro-batches per step: batch_size x this = examples per step"),
    "weight_decay": (0.1, "AdamW weight decay on matrices"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.95, "AdamW beta2"),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 = off"),
    "eval_interval": (5, "evaluate validation loss every N steps (and at the start and end)"),
    "eval_iters": (0, "validation batches per evaluation; 0 = the whole split"),
    "eval_batch_size": (64, "examples per validation batch"),
    "ckpt_interval": (0, "also write resume.pt every N steps; 0 = at evaluations only"),
    "eval_test": (True, "at the end, test accuracy of the best and last checkpoints"),
    "seed": (1337, "random seed: initialisation, data order, dropout"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", "auto (bfloat16, or float16 on GPUs without it; float32 on CPU), float32, bfloat16, float16"),
    "compile": (False, "torch.compile the model"),
    "n_layer": (4, "init_from=scratch: layers"),
    "n_head": (4, "init_from=scratch: attention heads"),
    "n_embd": (128, "init_from=scratch: width"),
    "block_size": (256, "init_from=scratch: context length"),
    "wandb_log": (False, "log to wandb (on by itself when a key is configured)"),
    "wandb_project": ("HW3_lora_finetune_handout", "wandb project"),
    "wandb_run_name": ("", "wandb run name; default: out_dir's name"),
    "debug": (False, "show full tracebacks"),
}
ARCHITECTURE = ("lora_rank", "lora_alpha", "n_layer", "n_head", "n_embd", "block_size")


class Diverged(RuntimeError):
    pass


def check_flags(c):
    rules = [
        ("lora_rank", c["lora_rank"] >= 0, "must be >= 0"),
        ("lora_dropout", 0 <= c["lora_dropout"] < 1, "must be in [0, 1)"),
        ("dropout", 0 <= c["dropout"] < 1, "must be in [0, 1)"),
        ("learning_rate", c["learning_rate"] > 0, "must be positive"),
        ("weight_decay", c["weight_decay"] >= 0, "must be >= 0"),
        ("beta1", 0 <= c["beta1"] < 1, "must be in [0, 1)"),
        ("beta2", 0 <= c["beta2"] < 1, "must be in [0, 1)"),
        ("grad_clip", c["grad_clip"] >= 0, "must be >= 0"),
        ("prompt_template", c["prompt_template"] in PROMPT_TEMPLATES, f"must be one of {', '.join(PROMPT_TEMPLATES)}"),
        ("resume", c["resume"] in ("off", "auto"), "must be off or auto"),
    ]
    rules += [(k, c[k] > 0, "must be positive") for k in (
        "max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_batch_size",
        "n_layer", "n_head", "n_embd", "block_size")]
    rules += [(k, c[k] >= 0, "must be >= 0") for k in ("eval_iters", "ckpt_interval")]
    rules.append(("n_embd", c["n_embd"] % c["n_head"] == 0, f"must be a multiple of n_head={c['n_head']}"))
    for key, ok, why in rules:
        if not ok:
            raise UsageError(f"{key}={c[key]!r}: {why}")


def check_out_dir(out_dir):
    """Fail before any work if out_dir cannot hold the run's files."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"out_dir={out_dir!r} is a file, not a directory")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"out_dir={out_dir!r} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"out_dir={out_dir!r} is not writable")


def holds_run(out_dir):
    return any(os.path.exists(os.path.join(out_dir, f)) for f in ("ckpt.pt", "ckpt_last.pt", "resume.pt"))


def remove_stale_temporaries(out_dir):
    """Temporary files left by a run that was killed while writing."""
    for name in os.listdir(out_dir):
        if re.fullmatch(r"\.(ckpt\.pt|ckpt_last\.pt|resume\.pt|metrics\.jsonl|results\.json|predictions\.json)\..+\.tmp", name):
            os.remove(os.path.join(out_dir, name))


def resume_config(config, explicit):
    """The interrupted run's config, with the flags given now on top; architecture must match."""
    path = os.path.join(config["out_dir"], "resume.pt")
    if not os.path.isfile(path):
        raise UsageError(f"init_from=resume: no {path} to resume from; "
                         f"start the run with: python train.py out_dir={config['out_dir']}")
    state = load_checkpoint(path)
    if "weights_in" in state:  # a finished run keeps its last weights in ckpt_last.pt only
        last = load_checkpoint(os.path.join(config["out_dir"], state["weights_in"]))
        if last["iter_num"] != state["iter_num"]:
            raise CheckpointError(f"{path} is at iteration {state['iter_num']} but {state['weights_in']} "
                                  f"at {last['iter_num']}; they are not of the same moment")
        state["model"] = last["model"]
    saved = state["config"]
    for key in ARCHITECTURE:
        if key in explicit and config[key] != saved[key]:
            raise UsageError(f"{key}={config[key]!r} differs from the checkpoint's {key}={saved[key]!r} "
                             f"in {path}; drop the flag or use a new out_dir")
    merged = dict(saved, **{k: config[k] for k in explicit if k != "init_from"})
    return merged, state


def build_model(config, state):
    """(model, base): the model to train, pretrained (+ LoRA), scratch, or the resumed run's, and
    the identity of the frozen weights its checkpoints apply to (None when every weight trains)."""
    try:
        if state is not None:
            model = load_model(state, base=config["init_from"])
            base = state["base"] and dict(state["base"], init_from=config["init_from"])
        elif config["init_from"] == "scratch":  # every weight trains; LoRA on random weights makes no sense
            model, base = GPT(GPTConfig(block_size=config["block_size"], n_layer=config["n_layer"],
                                        n_head=config["n_head"], n_embd=config["n_embd"], dropout=config["dropout"])), None
        else:
            lora = {k: config[k] for k in ("lora_rank", "lora_alpha", "lora_dropout")}
            model = GPT.from_pretrained(config["init_from"], dict(dropout=config["dropout"], **lora))
            base = None
            if model.config.lora_rank > 0:  # LoRA: only A and B train; checkpoints hold just those
                mark_only_lora_as_trainable(model)
                base = dict(init_from=config["init_from"], fingerprint=base_fingerprint(model))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise UsageError(f"init_from={config['init_from']!r}: {e}") from None
    return model, base


def rng_state(device):
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


@torch.no_grad()
def validation_loss(model, loader, config, device, dtype):
    """Mean loss per target token over the validation split (eval mode: LoRA merged)."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in loader.batches("validation", config["eval_batch_size"], config["eval_iters"]):
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), reduction="sum")
        total += loss.float()
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total.item() / count


def setup_distributed(device):
    """(rank, world size, device) under torchrun; (0, 1, device) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def make_optimizer(model, config, device, state):
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in trainable if p.dim() >= 2], weight_decay=config["weight_decay"]),
              dict(params=[p for p in trainable if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=config["learning_rate"], betas=(config["beta1"], config["beta2"]),
                                  fused=device.startswith("cuda"))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group, fresh in zip(optimizer.param_groups, groups):  # flags given now win over saved ones
            group.update(lr=config["learning_rate"], betas=(config["beta1"], config["beta2"]),
                         weight_decay=fresh["weight_decay"])
    return optimizer


def train_step(model, loader, optimizer, scaler, iter_num, config, rank, world, device, dtype):
    """One optimizer step on the step's examples (this process's share); returns (loss, tokens)."""
    step_examples = config["batch_size"] * config["gradient_accumulation_steps"]
    examples = loader.train_examples(iter_num * step_examples, step_examples)
    targets = sum(len(ids) - (1 if not config["mask_prompt"] else n_prompt) for ids, n_prompt in examples)
    share = step_examples // world
    # micro-batches of similar length pad less; the step's examples, and so its update, stay the same
    mine = sorted(examples[rank * share:(rank + 1) * share], key=lambda e: len(e[0]))
    micro = [mine[i:i + config["batch_size"]] for i in range(0, share, config["batch_size"])]
    step_loss, tokens = torch.zeros((), device=device), 0
    for k, batch in enumerate(micro):
        x, y = loader.collate(batch)
        tokens += x.numel()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = k == len(micro) - 1
        with nullcontext() if world == 1 or last else model.no_sync():  # DDP syncs gradients once a step
            with autocast(device, dtype):
                _, loss = model(x, y, reduction="sum")
            # normalised over the target tokens of the whole step; DDP averages over processes
            loss = loss * world / targets
            scaler.scale(loss).backward()
        step_loss += loss.detach()
    if config["grad_clip"] > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config["grad_clip"])
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        dist.all_reduce(step_loss)
    return step_loss.item() / world, tokens * world


def train(config, explicit):
    check_flags(config)
    out_dir = config["out_dir"]
    check_out_dir(out_dir)
    state = None
    resuming = config["init_from"] == "resume" or (
        config["resume"] == "auto" and os.path.isfile(os.path.join(out_dir, "resume.pt")))
    if resuming:
        config, state = resume_config(config, explicit)
        check_flags(config)
    device = resolve_device(config["device"])
    dtype = resolve_dtype(config["dtype"], device)
    if not resuming and config["resume"] == "off" and holds_run(out_dir) and not config["overwrite"]:
        raise UsageError(f"out_dir={out_dir!r} holds an earlier run; continue it with resume=auto, "
                         "replace it with overwrite=true, or choose another out_dir")
    records = load_rotten_tomatoes(config["dataset"])  # bad data stops the run before any download or write
    rank, world, device = setup_distributed(device)
    master = rank == 0
    step_examples = config["batch_size"] * config["gradient_accumulation_steps"]
    if step_examples % world:
        raise UsageError(f"batch_size x gradient_accumulation_steps = {step_examples} is not divisible by {world} processes")
    torch.manual_seed(config["seed"] + rank)

    raw_model, base = build_model(config, state)
    raw_model.to(device)
    loader = CustomDataLoader(records, raw_model.config.block_size, config["prompt_template"],
                              config["mask_prompt"], config["seed"])
    optimizer = make_optimizer(raw_model, config, device, state)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    iter_num, best_val_loss = 0, math.inf
    if state is not None:
        scaler.load_state_dict(state["scaler"])
        iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
        if master:
            set_rng_state(state["rng"], device)
    model = torch.compile(raw_model) if config["compile"] else raw_model
    if world > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    log = None
    if master:
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_temporaries(out_dir)
        log = RunLog(config, iter_num if state else None)
        if state is not None:
            print(f"resuming {out_dir} at iteration {iter_num} of {config['max_iters']}")
        print(f"{config['init_from']} on {device} ({dtype}); {describe_parameters(raw_model)}")
        print(f"{step_examples} examples per step; {len(loader.examples['train'])} train, "
              f"{len(loader.examples['validation'])} validation examples" + (
                  f"; {loader.truncated} reviews truncated to fit {raw_model.config.block_size} tokens"
                  if loader.truncated else ""))

    def checkpoint(**entries):
        return make_checkpoint(raw_model, base, iter_num=iter_num, best_val_loss=best_val_loss, config=config, **entries)

    def save(name, checkpoint):
        save_checkpoint(os.path.join(out_dir, name), checkpoint)

    def save_resume_state():
        save("resume.pt", checkpoint(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng_state(device)))

    def evaluate():
        nonlocal best_val_loss
        t_val = time.time()
        val_loss = validation_loss(raw_model, loader, config, device, dtype)
        if not math.isfinite(val_loss):
            raise Diverged(f"validation loss is {val_loss} at iteration {iter_num}; checkpoints left as they were")
        improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
        if master:
            log.log(iter=iter_num, val_loss=val_loss, val_time=round(time.time() - t_val, 3),
                    elapsed=round(time.time() - t0, 2))
            if improved:  # before resume.pt, so resume.pt never claims a best that ckpt.pt lacks
                save("ckpt.pt", checkpoint())
            save_resume_state()
            tqdm.write(f"iter {iter_num}: validation loss {val_loss:.4f}" + (" (best so far: ckpt.pt)" if improved else ""))
        return val_loss

    t0 = time.time() - (log.elapsed_before if master else 0.0)  # elapsed counts across resumed sessions
    val_loss = evaluate() if state is None else best_val_loss
    with tqdm(total=config["max_iters"], initial=iter_num, desc="train", unit="step", disable=not master,
              file=sys.stderr) as bar:
        while iter_num < config["max_iters"]:
            t_step = time.time()
            train_loss, tokens = train_step(model, loader, optimizer, scaler, iter_num, config, rank, world, device, dtype)
            if not math.isfinite(train_loss):
                raise Diverged(f"training loss is {train_loss} at iteration {iter_num + 1}; checkpoints left as they were")
            iter_num += 1
            step_time = time.time() - t_step
            if master:
                log.log(iter=iter_num, train_loss=train_loss, lr=config["learning_rate"], tokens=tokens,
                        step_time=round(step_time, 4), elapsed=round(time.time() - t0, 2))
            if iter_num % config["eval_interval"] == 0 or iter_num == config["max_iters"]:
                val_loss = evaluate()
            elif master and config["ckpt_interval"] and iter_num % config["ckpt_interval"] == 0:
                save_resume_state()
            bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}",
                            tok_s=f"{tokens / step_time:,.0f}", refresh=False)
            bar.update(1)

    if master:
        last = checkpoint()
        save("ckpt_last.pt", last)
        # a finished run's resume.pt takes its weights from ckpt_last.pt instead of holding a second copy
        save("resume.pt", dict(last, model={}, weights_in="ckpt_last.pt", optimizer=optimizer.state_dict(),
                               scaler=scaler.state_dict(), rng=rng_state(device)))
        print(f"done: {iter_num} steps in {time.time() - t0:.1f} s; best validation loss {best_val_loss:.4f}")
        if config["eval_test"]:
            test_accuracy(raw_model, loader, config, device, dtype)
        log.finish()
    if world > 1:
        dist.destroy_process_group()


def test_accuracy(model, loader, config, device, dtype):
    """The Best Val and Last Iter lines on the test split, through generate.py's evaluation."""
    import generate
    settings = dict(prompt_template=config["prompt_template"], max_new_tokens=5, temperature=0.0,
                    top_k=0, batch_size=config["eval_batch_size"], seed=config["seed"],
                    init_from=config["init_from"], dataset=config["dataset"], device=device_name(device))
    records = loader.records["test"]
    rows, sets = generate.evaluate(model, "Last Iter Checkpoint", records, ["generate"], settings, device, dtype)
    model.train()
    load_trained(model, load_checkpoint(os.path.join(config["out_dir"], "ckpt.pt"), device)["model"])
    best_rows, best_sets = generate.evaluate(model, "Best Val Checkpoint", records, ["generate"], settings, device, dtype)
    generate.write_results(config["out_dir"], "test", settings, best_rows + rows, best_sets + sets)


def main(argv):
    config, explicit = parse_flags("train.py", FLAGS, argv, __doc__)
    try:
        return train(config, explicit)
    except (UsageError, DataError, CheckpointError) as e:
        if config["debug"]:
            raise
        fail("train.py", str(e))
    except (Diverged, OSError) as e:  # not a usage error: exit status 1
        if config["debug"]:
            raise
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
