"""Fine-tune GPT-2 on Rotten Tomatoes reviews: LoRA on q, k, v (lora_rank > 0) or full fine-tuning.

    python train.py                                        # gpt2-medium, LoRA r=128, alpha=512
    python train.py rank=16 alpha=64 out_dir=runs/r16_a64  # one row of the handout's table
    python train.py resume=auto out_dir=runs/r16_a64       # continue an interrupted run (or start it)
    torchrun --nproc_per_node=2 train.py ...               # data parallel over 2 processes

Writes ckpt.pt (best validation loss), ckpt_last.pt (the latest state, to resume from),
metrics.jsonl, and the test accuracy of both checkpoints (results.json, predictions.json) to
out_dir. runs.py, the harness, keeps the run safe: a lock on out_dir, resuming, whole files.
"""
import math
import sys
import time

import torch
import torch.distributed as dist

import runs
from configurator import autocast, device_and_dtype, distributed, parse_flags, process_group
from dataloader import IGNORE_INDEX, PROMPT_TEMPLATES, CustomDataLoader, by_length, load_rotten_tomatoes
from lora import mark_only_lora_as_trainable
from model import GPT, GPTConfig, count_parameters

FLAGS = {  # name: (default, help[, allowed values])
    "out_dir": ("out", "directory for checkpoints, metrics.jsonl and results"),
    "resume": ("off", "auto: continue out_dir's interrupted run if there is one, else start it; off: always start afresh", ("off", "auto")),
    "overwrite": (False, "start afresh even where out_dir holds an earlier run (its files are removed first)"),
    "init_from": ("gpt2-medium", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub id or local Hugging Face GPT-2 directory; 'resume' continues out_dir; 'scratch' trains every weight of a small random model (sized by n_layer, n_head, n_embd, block_size)"),
    "dataset": ("rotten_tomatoes", "hub dataset name, or a local directory with train/validation/test.jsonl"),
    "prompt_template": ("default", "instruction template", tuple(PROMPT_TEMPLATES)),
    "mask_prompt": (True, "loss on the answer tokens only; false: on the whole sequence"),
    "share_prefix": (True, "compute the start every review of a batch shares (the instruction) once per batch, whose rows then share its dropout masks; false: once per review"),
    "lora_rank": (128, "LoRA rank on the q, k, v projections; 0 = full fine-tuning", ">= 0"),
    "lora_alpha": (512.0, "LoRA alpha: the update is scaled by alpha / rank", "> 0"),
    "lora_dropout": (0.05, "dropout on the input of the LoRA branch", "[0, 1)"),
    "dropout": (0.0, "dropout inside the transformer", "[0, 1)"),
    "learning_rate": (2.5e-4, "AdamW learning rate, constant", "> 0"),
    "max_iters": (80, "optimizer steps", "> 0"),
    "batch_size": (32, "examples per micro-batch (per process)", "> 0"),
    "gradient_accumulation_steps": (4, "micro-batches per step: batch_size x this = examples per step", "> 0"),
    "weight_decay": (0.1, "AdamW weight decay on matrices", ">= 0"),
    "beta1": (0.9, "AdamW beta1", "[0, 1)"),
    "beta2": (0.95, "AdamW beta2", "[0, 1)"),
    "grad_clip": (1.0, "clip the gradient norm to this; 0 = off", ">= 0"),
    "eval_interval": (5, "evaluate validation loss every N steps (and at the start and end)", "> 0"),
    "eval_iters": (0, "validation batches per evaluation; 0 = the whole split", ">= 0"),
    "eval_batch_size": (64, "examples per validation batch", "> 0"),
    "ckpt_interval": (0, "also write ckpt_last.pt every N steps; 0 = at evaluations only", ">= 0"),
    "eval_test": (True, "at the end, test accuracy of the best and last checkpoints"),
    "seed": (1337, "random seed: initialisation, data order, dropout", "[0, 2**32)"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", "auto (bfloat16, or float16 on GPUs without it; float32 on CPU)", ("auto", "float32", "bfloat16", "float16")),
    "compile": (False, "torch.compile the model"),
    "n_layer": (4, "init_from=scratch: layers", "> 0"),
    "n_head": (4, "init_from=scratch: attention heads", "> 0"),
    "n_embd": (128, "init_from=scratch: width", "> 0"),
    "block_size": (256, "init_from=scratch: context length", "> 0"),
    "wandb_log": (False, "log to wandb (on by itself when a key is configured)"),
    "wandb_project": ("HW3_lora_finetune_handout", "wandb project"),
    "wandb_run_name": ("", "wandb run name; default: out_dir's name"),
    "debug": (False, "show full tracebacks"),
}


def build_model(config, run):
    """GPT-2 with LoRA layers (lora_rank > 0) or without, a small random GPT (init_from=scratch), or the resumed run's."""
    if run.resume is not None:
        model = runs.load_model(run.resume, base=config.init_from)
    elif config.init_from == "scratch":
        model = GPT(GPTConfig(block_size=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
                              n_embd=config.n_embd, dropout=config.dropout))
    else:
        with runs.loading_weights("init_from", config.init_from):
            model = GPT.from_pretrained(config.init_from, {k: getattr(config, k) for k in (
                "dropout", "lora_rank", "lora_alpha", "lora_dropout")})
    if model.config.lora_rank > 0:
        mark_only_lora_as_trainable(model)
    return model


def make_optimizer(model, config, device):
    """AdamW over the parameters that train, with weight decay on matrices only."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in trained if p.dim() >= 2], weight_decay=config.weight_decay),
              dict(params=[p for p in trained if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             fused=device.startswith("cuda"))


@torch.no_grad()
def validation_loss(model, loader, config, device, dtype, progress=True):
    """Mean loss per target token over the validation split (eval mode: LoRA merged)."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in runs.progress(loader.batches("validation", config.eval_batch_size, config.eval_iters), "validation", progress):
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), reduction="sum", share_prefix=config.share_prefix)
        total += loss.float()
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total.item() / count


def forward_backward(model, loader, scaler, iter_num, config, device, dtype, rank=0, world=1):
    """Gradients of step iter_num + 1 over this process's share of its reviews; returns (loss, tokens)."""
    step_reviews = config.batch_size * config.gradient_accumulation_steps
    examples = loader.train_examples(iter_num * step_reviews, step_reviews)
    targets = sum(len(ids) - (n_prompt if config.mask_prompt else 1) for ids, n_prompt in examples)
    share = step_reviews // world
    # micro-batches of similar length pad less; the step's reviews, and so its update, stay the same
    micro = by_length(examples[rank * share:(rank + 1) * share], config.batch_size, lambda e: len(e[0]))
    step_loss, tokens = torch.zeros((), device=device), 0
    for batch in micro:
        x, y = loader.collate(batch)
        tokens += x.numel()
        with autocast(device, dtype):
            _, loss = model(x.to(device), y.to(device), reduction="sum", share_prefix=config.share_prefix)
        loss = loss / targets  # per target token of the whole step
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    if world > 1:  # the step's loss and gradients: sums over every process's reviews
        dist.all_reduce(step_loss)
        for p in model.parameters():
            if p.requires_grad:
                dist.all_reduce(p.grad)
    return step_loss.item(), tokens * world


def clip_and_step(optimizer, scaler, grad_clip):
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train(model, loader, run, device, dtype, rank=0, world=1):
    """nanoGPT's loop: evaluate and save, stop at max_iters, forward and backward, clip and step, log."""
    config = run.config
    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    iter_num, best_val_loss = run.restore(optimizer, scaler, device)
    evaluated = iter_num if run.resume else -1  # a resumed iteration's evaluation, if it has one, came before its save
    step_model = torch.compile(model) if config.compile else model
    if world > 1:  # every process starts from process 0's weights: each drew its own random ones
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.detach(), src=0)
    while True:
        # the validation loss at the start, every eval_interval steps and at the end; the checkpoints
        if (iter_num % config.eval_interval == 0 or iter_num == config.max_iters) and iter_num != evaluated:
            t0 = time.time()
            val_loss = validation_loss(model, loader, config, device, dtype, progress=run.master)
            if not math.isfinite(val_loss):
                raise runs.Diverged(f"validation loss is {val_loss} at iteration {iter_num}; checkpoints left as they were")
            run.log(iter=iter_num, val_loss=val_loss, val_time=round(time.time() - t0, 3))
            if val_loss < best_val_loss:  # ckpt.pt first: a kill between the writes leaves the older pair
                best_val_loss = val_loss
                run.save("ckpt.pt", model, iter_num, best_val_loss)
            run.save("ckpt_last.pt", model, iter_num, best_val_loss, optimizer, scaler)
        if iter_num == config.max_iters:
            break

        # one optimizer step over batch_size x gradient_accumulation_steps reviews
        t0 = time.time()
        ckpt_due = config.ckpt_interval > 0 and iter_num % config.ckpt_interval == 0 and iter_num % config.eval_interval != 0
        rng = runs.rng_state(device) if ckpt_due else None  # before this step's dropout draws
        train_loss, tokens = forward_backward(step_model, loader, scaler, iter_num, config, device, dtype, rank, world)
        if not math.isfinite(train_loss):
            raise runs.Diverged(f"training loss is {train_loss} at iteration {iter_num + 1}; checkpoints left as they were")
        if ckpt_due:  # the state whose loss has just proved finite, before the step changes it
            run.save("ckpt_last.pt", model, iter_num, best_val_loss, optimizer, scaler, rng)
        clip_and_step(optimizer, scaler, config.grad_clip)
        iter_num += 1
        run.log(iter=iter_num, train_loss=train_loss, lr=config.learning_rate, tokens=tokens,
                step_time=round(time.time() - t0, 4))
    run.finish(iter_num, best_val_loss)


def main(argv):
    config, explicit = parse_flags("train.py", FLAGS, argv, __doc__)
    with runs.reported_errors("train.py", config.debug):
        device, dtype = device_and_dtype(config.device, config.dtype)
        rank, world, device = distributed(device)
        with runs.open_run(config, explicit, "train.py", rank, world) as run:
            config = run.config
            torch.manual_seed(config.seed + rank)
            records = load_rotten_tomatoes(config.dataset)  # bad data stops the run before the model loads
            model = build_model(config, run).to(device)
            loader = CustomDataLoader(records, model.config.block_size, config.prompt_template, config.mask_prompt,
                                      config.seed)
            run.check_sizes(model, loader, world)  # a step fits in the train split, a test prompt in the context
            trainable, total = count_parameters(model)
            run.print(f"{config.init_from} on {device} ({dtype}); trainable parameters: {trainable:,} of {total:,} "
                      f"({100 * trainable / total:.2f}%); {loader.truncated} reviews truncated to fit")
            with process_group(device, world):
                train(model, loader, run, device, dtype, rank, world)
            if config.eval_test and run.master and not run.tested():
                run.test_accuracy(model, loader.records["test"], device, dtype)


if __name__ == "__main__":
    main(sys.argv[1:])
