"""Fine-tune GPT-2 on Rotten Tomatoes reviews: LoRA on q, k, v (lora_rank > 0) or full fine-tuning.

    python train.py                                        # gpt2-medium, LoRA r=128, alpha=512
    python train.py rank=16 alpha=64 out_dir=runs/r16_a64  # one row of the handout's table
    python train.py init_from=resume out_dir=runs/r16_a64  # continue an interrupted run
    torchrun --nproc_per_node=2 train.py ...               # data parallel over 2 processes

Writes to out_dir: ckpt.pt (best validation loss), ckpt_last.pt (last iteration), resume.pt
(the latest state, to continue after an interruption), metrics.jsonl, and at the end the test
accuracy of both checkpoints (results.json, predictions.json).
"""
import contextlib
import math
import os
import sys
import time
import uuid

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from checkpoint import (CheckpointError, base_fingerprint, is_finite, load_checkpoint, load_model, load_trained,
                        make_checkpoint, save_checkpoint)
from configurator import (UsageError, autocast, check_source, device_name, fail, parse_flags, resolve_device,
                          resolve_dtype, source_error)
from dataloader import (PROMPT_TEMPLATES, CustomDataLoader, DataError, check_prompt_room, get_tokenizer,
                        load_rotten_tomatoes)
from lora import mark_only_lora_as_trainable
from model import GPT, IGNORE_INDEX, GPTConfig, describe_parameters
from outdir import check_out_dir, holds_run, locked, remove_run_files, remove_stale_temporaries, start_or_resume
from runlog import RunLog

FLAGS = {
    "out_dir": ("out", "directory for checkpoints, metrics.jsonl and results"),
    "resume": ("off", "auto: continue out_dir's interrupted run if there is one, else start it; off: always start afresh"),
    "overwrite": (False, "start afresh even where out_dir holds an earlier run (its files are removed first)"),
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
TEST_MAX_NEW_TOKENS = 5  # the test accuracy at the end generates this many tokens per review


class Diverged(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# what can be checked before anything is loaded or written

def check_flags(c):
    rules = [
        ("lora_rank", c.lora_rank >= 0, "must be >= 0"),
        ("lora_alpha", c.lora_alpha > 0 or c.lora_rank == 0, "must be positive (the update is scaled by alpha / rank)"),
        ("lora_dropout", 0 <= c.lora_dropout < 1, "must be in [0, 1)"),
        ("dropout", 0 <= c.dropout < 1, "must be in [0, 1)"),
        ("learning_rate", c.learning_rate > 0, "must be positive"),
        ("weight_decay", c.weight_decay >= 0, "must be >= 0"),
        ("beta1", 0 <= c.beta1 < 1, "must be in [0, 1)"),
        ("beta2", 0 <= c.beta2 < 1, "must be in [0, 1)"),
        ("grad_clip", c.grad_clip >= 0, "must be >= 0"),
        ("seed", 0 <= c.seed < 2**32, "must be in [0, 2**32)"),
        ("prompt_template", c.prompt_template in PROMPT_TEMPLATES, f"must be one of {', '.join(PROMPT_TEMPLATES)}"),
        ("resume", c.resume in ("off", "auto"), "must be off or auto"),
    ]
    rules += [(k, getattr(c, k) > 0, "must be positive") for k in (
        "max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_batch_size",
        "n_layer", "n_head", "n_embd", "block_size")]
    rules += [(k, getattr(c, k) >= 0, "must be >= 0") for k in ("eval_iters", "ckpt_interval")]
    rules.append(("n_embd", c.n_embd % c.n_head == 0, f"must be a multiple of n_head={c.n_head}"))
    for key, ok, why in rules:
        if not ok:
            raise UsageError(f"{key}={getattr(c, key)!r}: {why}")


# -----------------------------------------------------------------------------
# the pieces of a run

def build_model(config, state):
    """The model to train: pretrained GPT-2 with LoRA layers (lora_rank > 0), a small random one
    (scratch: every weight trains; LoRA on random weights makes no sense), or the resumed run's."""
    try:
        if state is not None:
            return load_model(state, base=config.init_from)
        if config.init_from == "scratch":
            return GPT(GPTConfig(block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
                                 n_embd=config.n_embd, dropout=config.dropout))
        return GPT.from_pretrained(config.init_from, dict(dropout=config.dropout, lora_rank=config.lora_rank,
                                                          lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout))
    except CheckpointError:
        raise
    except ValueError as e:
        raise source_error("init_from", config.init_from, e) from None


def make_optimizer(model, config, device, state):
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in trained if p.dim() >= 2], weight_decay=config.weight_decay),
              dict(params=[p for p in trained if p.dim() < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                                  fused=device.startswith("cuda"))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        for group, fresh in zip(optimizer.param_groups, groups):  # flags given now win over saved ones
            group.update(lr=config.learning_rate, betas=(config.beta1, config.beta2), weight_decay=fresh["weight_decay"])
    return optimizer


def rng_state(device):
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def setup_distributed(device):
    """(rank, world size, device) under torchrun; (0, 1, device) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


@torch.no_grad()
def validation_loss(model, loader, config, *, device, dtype, progress=False, share_prefix=True):
    """Mean loss per target token over the validation split (eval mode: LoRA merged)."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    batches = loader.batches("validation", config.eval_batch_size, config.eval_iters)
    for x, y in tqdm(batches, desc="validation", unit="batch", total=loader.num_batches(
            "validation", config.eval_batch_size, config.eval_iters), leave=False, disable=not progress, file=sys.stderr):
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), reduction="sum", share_prefix=share_prefix)
        total += loss.float()
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total.item() / count


def forward_backward(model, loader, scaler, iter_num, config, *, device, dtype, rank=0, world=1):
    """Gradients of step iter_num + 1 over its examples (this process's share); returns (loss, tokens)."""
    step_examples = config.batch_size * config.gradient_accumulation_steps
    examples = loader.train_examples(iter_num * step_examples, step_examples)
    targets = sum(len(ids) - (n_prompt if config.mask_prompt else 1) for ids, n_prompt in examples)
    share = step_examples // world
    # micro-batches of similar length pad less; the step's examples, and so its update, stay the same
    mine = sorted(examples[rank * share:(rank + 1) * share], key=lambda e: len(e[0]))
    micro = [mine[i:i + config.batch_size] for i in range(0, share, config.batch_size)]
    step_loss, tokens = torch.zeros((), device=device), 0
    for k, batch in enumerate(micro):
        x, y = loader.collate(batch)
        tokens += x.numel()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last = k == len(micro) - 1
        with contextlib.nullcontext() if world == 1 or last else model.no_sync():  # DDP syncs gradients once a step
            with autocast(device, dtype):
                _, loss = model(x, y, reduction="sum")
            loss = loss * world / targets  # per target token of the whole step; DDP averages over processes
            scaler.scale(loss).backward()
        step_loss += loss.detach()
    if world > 1:
        dist.all_reduce(step_loss)
    return step_loss.item() / world, tokens * world


def clip_and_step(optimizer, scaler, params, grad_clip):
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def test_accuracy(model, loader, config, device, dtype):
    """The Best Val and Last Iter lines on the test split, through generate.py's evaluation."""
    import generate
    settings = dict(prompt_template=config.prompt_template, max_new_tokens=TEST_MAX_NEW_TOKENS, temperature=0.0,
                    top_k=0, parse="near_start", batch_size=config.eval_batch_size, seed=config.seed,
                    init_from=config.init_from, dataset=config.dataset, device=device_name(device))
    records = loader.records["test"]
    rows, sets = generate.evaluate(model, "Last Iter Checkpoint", records, ["generate"], settings, device=device,
                                   dtype=dtype)
    model.train()
    best = load_checkpoint(os.path.join(config.out_dir, "ckpt.pt"), device)
    load_trained(model, best["model"])
    best_rows, best_sets = generate.evaluate(model, "Best Val Checkpoint", records, ["generate"], settings,
                                             device=device, dtype=dtype)
    return generate.write_results(config.out_dir, best["run_id"], "test", best_rows + rows, best_sets + sets, complete=True)


# -----------------------------------------------------------------------------

def train(config, explicit):
    check_flags(config)
    check_out_dir(config.out_dir)
    resolve_dtype(config.dtype, resolve_device(config.device))  # a bad flag stops before out_dir is read
    master = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as hold:  # one process at a time reads and writes a run's files
        if master and os.path.isdir(config.out_dir):
            hold.enter_context(locked(config.out_dir, "train.py"))
        config, state = start_or_resume(config, explicit)
        check_flags(config)
        run(config, state, hold)


def run(config, state, hold):
    out_dir = config.out_dir
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.init_from != "scratch":  # a missing directory, or an unreachable hub, is found out now
        check_source("init_from", config.init_from)
    check_source("dataset", config.dataset)
    get_tokenizer()  # downloaded once; better to fail here than after loading the data and the model
    records = load_rotten_tomatoes(config.dataset)  # bad data stops the run before the model downloads
    rank, world, device = setup_distributed(device)
    master = rank == 0
    step_examples = config.batch_size * config.gradient_accumulation_steps
    if step_examples % world:
        raise UsageError(f"batch_size x gradient_accumulation_steps = {step_examples} is not divisible by {world} processes")
    torch.manual_seed(config.seed + rank)

    # the model: GPT-2 with LoRA on q, k, v, where only A and B train, or every weight trained
    raw_model = build_model(config, state)
    base = None  # what a LoRA checkpoint applies to: where the frozen weights come from, and their fingerprint
    if raw_model.config.lora_rank > 0:
        mark_only_lora_as_trainable(raw_model)
        base = dict(init_from=config.init_from,
                    fingerprint=state["base"]["fingerprint"] if state else base_fingerprint(raw_model))
    raw_model.to(device)
    if config.eval_test:  # the test prompts at the end must fit beside the answer's tokens
        check_prompt_room(config.prompt_template, raw_model.config.block_size, TEST_MAX_NEW_TOKENS)
    loader = CustomDataLoader(records, raw_model.config.block_size, config.prompt_template, config.mask_prompt,
                              config.seed)
    optimizer = make_optimizer(raw_model, config, device, state)
    trained = [p for p in raw_model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    iter_num, best_val_loss = 0, math.inf
    if state is not None:
        scaler.load_state_dict(state["scaler"])
        iter_num, best_val_loss = state["iter_num"], state["best_val_loss"]
        if master:
            set_rng_state(state["rng"], device)
    val_loss = best_val_loss
    model = torch.compile(raw_model) if config.compile else raw_model
    if world > 1:
        model = DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    run_id = state["run_id"] if state else uuid.uuid4().hex[:12]

    if master:
        if not os.path.isdir(out_dir):  # made now, after every check that could fail, and held from now on
            os.makedirs(out_dir, exist_ok=True)
            hold.enter_context(locked(out_dir, "train.py"))
            if holds_run(out_dir):
                raise UsageError(f"out_dir={out_dir!r} was filled by another run meanwhile; nothing was changed")
        if state is None:
            remove_run_files(out_dir)
        remove_stale_temporaries(out_dir)
        log = RunLog(config, iter_num if state else None)
        print("".join(f"{k} = {v!r}\n" for k, v in vars(config).items()), end="")
        if state is not None:
            print(f"resuming {out_dir} at iteration {iter_num} of {config.max_iters}")
        print(f"{config.init_from} on {device} ({dtype}); {describe_parameters(raw_model)}")
        print(f"{step_examples} examples per step; {len(loader.examples['train'])} train, "
              f"{len(loader.examples['validation'])} validation examples" + (
                  f"; {loader.truncated} reviews truncated to fit {raw_model.config.block_size} tokens"
                  if loader.truncated else ""))

    def save(name, **entries):
        checkpoint = make_checkpoint(raw_model, base, run_id=run_id, iter_num=iter_num, best_val_loss=best_val_loss,
                                     config=vars(config), **entries)
        if not is_finite(checkpoint):  # nothing that has diverged replaces a good state
            raise Diverged(f"the weights are not finite at iteration {iter_num}; checkpoints left as they were")
        save_checkpoint(os.path.join(out_dir, name), checkpoint)
        return checkpoint

    def resume_entries(rng):
        return dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng)

    t0 = time.time() - (log.elapsed_before if master else 0.0)  # elapsed counts across resumed sessions
    bar = hold.enter_context(tqdm(total=config.max_iters, initial=iter_num, desc="train", unit="step",
                                  disable=not master, file=sys.stderr))  # closed on an error too: it ends its line
    while True:
        # validation loss at the start, every eval_interval steps and at the end; a resumed
        # iteration was evaluated before its resume.pt was written
        due = iter_num % config.eval_interval == 0 or iter_num == config.max_iters
        if due and not (state and iter_num == state["iter_num"]):
            t_val = time.time()
            val_loss = validation_loss(raw_model, loader, config, device=device, dtype=dtype, progress=master)
            if not math.isfinite(val_loss):
                raise Diverged(f"validation loss is {val_loss} at iteration {iter_num}; checkpoints left as they were")
            improved, best_val_loss = val_loss < best_val_loss, min(best_val_loss, val_loss)
            if master:
                log.log(iter=iter_num, val_loss=val_loss, val_time=round(time.time() - t_val, 3),
                        elapsed=round(time.time() - t0, 2))
                if improved:  # before resume.pt, so resume.pt never claims a best that ckpt.pt lacks
                    save("ckpt.pt")
                save("resume.pt", **resume_entries(rng_state(device)))
                tqdm.write(f"iter {iter_num}: validation loss {val_loss:.4f}" + (" (best so far: ckpt.pt)" if improved else ""))
            if not bar.disable:  # the bar's rate and ETA count training steps only
                paused = time.time() - t_val
                bar.start_t += paused
                bar.last_print_t += paused
        if iter_num == config.max_iters:
            break

        # one optimizer step over batch_size x gradient_accumulation_steps examples
        t_step = time.time()
        ckpt_due = master and config.ckpt_interval and iter_num % config.ckpt_interval == 0 and not due
        rng = rng_state(device) if ckpt_due else None  # the state before this step's dropout draws
        train_loss, tokens = forward_backward(model, loader, scaler, iter_num, config, device=device, dtype=dtype,
                                              rank=rank, world=world)
        if not math.isfinite(train_loss):
            raise Diverged(f"training loss is {train_loss} at iteration {iter_num + 1}; checkpoints left as they were")
        if ckpt_due:  # the state whose loss has just proved finite, before the step changes it
            save("resume.pt", **resume_entries(rng))
        clip_and_step(optimizer, scaler, trained, config.grad_clip)
        iter_num += 1
        step_time = time.time() - t_step
        if master:
            log.log(iter=iter_num, train_loss=train_loss, lr=config.learning_rate, tokens=tokens,
                    step_time=round(step_time, 4), elapsed=round(time.time() - t0, 2))
        bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", tok_s=f"{tokens / step_time:,.0f}",
                        refresh=False)
        bar.update(1)
    bar.close()

    if master:
        last = save("ckpt_last.pt")
        # a finished run's resume.pt takes its weights from ckpt_last.pt instead of holding a second copy
        save_checkpoint(os.path.join(out_dir, "resume.pt"),
                        dict(last, model={}, weights_in="ckpt_last.pt", **resume_entries(rng_state(device))))
        print(f"done: {iter_num} steps in {time.time() - t0:.1f} s; best validation loss {best_val_loss:.4f}\n"
              f"checkpoints: {os.path.join(out_dir, 'ckpt.pt')} (best), {os.path.join(out_dir, 'ckpt_last.pt')} (last); "
              "resume.pt and metrics.jsonl beside them")
        if config.eval_test:
            print(f"results: {test_accuracy(raw_model, loader, config, device, dtype)} and predictions.json")
        log.finish()
    if world > 1:
        dist.destroy_process_group()


def main(argv):
    config, explicit = parse_flags("train.py", FLAGS, argv, __doc__)
    try:
        return train(config, explicit)
    except (UsageError, DataError, CheckpointError, OSError) as e:  # fix it and rerun: resume=auto continues
        if config.debug:
            raise
        fail("train.py", str(e))
    except Diverged as e:  # not fixed by rerunning the same command: exit status 1
        if config.debug:
            raise
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
