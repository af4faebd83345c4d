"""Fine-tune GPT-2 on Rotten Tomatoes reviews: LoRA on q, k, v, full fine-tuning, or another method.

    python train.py                                        # gpt2-medium, LoRA r=128, alpha=512
    python train.py rank=16 alpha=64 out_dir=runs/r16_a64  # one row of the handout's table
    python train.py resume=auto out_dir=runs/r16_a64       # continue an interrupted run (or start it)
    torchrun --nproc_per_node=2 train.py ...               # data parallel over 2 processes

Writes ckpt.pt (best validation loss), ckpt_last.pt (the latest state, to resume from), metrics.jsonl
and the test accuracy of both checkpoints (results.json) to out_dir. The harness package keeps the
run safe: one process per out_dir, exact resumes, whole files.
"""
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import generate
from dataloader import (IGNORE_INDEX, PROMPT_TEMPLATES, CustomDataLoader, DataError, by_length,
                        check_prompt_room, encode_prompt, fingerprint, get_tokenizer, load_rotten_tomatoes)
from harness.checkpoints import check_source, load_model, loading_weights
from harness.device import autocast, device_and_dtype
from harness.flags import Diverged, UsageError, defaults, parse_flags, reported_errors
from harness.run import MACHINE, open_run, rng_state
from finetune import METHOD_SETTINGS, apply_method, other_methods_settings
from model import GPT, GPTConfig, count_parameters
from prefix import init_prefixes

FLAGS = {  # name: (default, help[, allowed values])
    "out_dir": ("out", "directory for checkpoints, metrics.jsonl and results"),
    "resume": ("off", "auto: continue out_dir's interrupted run if there is one, else start it; off: always "
                      "start afresh", ("off", "auto")),
    "overwrite": (False, "start afresh even where out_dir holds an earlier run (whose files are removed)"),
    "init_from": ("gpt2-medium", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub id or local Hugging Face "
                                 "GPT-2 directory; 'resume' continues out_dir; 'scratch' trains every "
                                 "weight of a small random model (n_layer, n_head, n_embd, block_size)"),
    "dataset": ("rotten_tomatoes", "hub dataset name, or a local directory with train/validation/test.jsonl"),
    "prompt_template": ("default", "instruction template", tuple(PROMPT_TEMPLATES)),
    "mask_prompt": (True, "loss on the answer only (the label word and <|endoftext|>); false: on the whole "
                          "sequence"),
    "share_prefix": (True, "compute the start every review of a batch shares (the instruction) once per "
                           "batch, whose rows then share its dropout masks; false: once per review"),
    "method": ("lora", "what trains: lora (LoRA on q, k, v; lora_rank=0 trains every weight), bitfit (the "
                       "biases), adapter (bottleneck adapters after each sublayer) or prefix (prefix tuning)",
               ("lora", "bitfit", "adapter", "prefix")),
    "adapter_size": (24, "method=adapter: the adapters' bottleneck size", "> 0"),
    "prefix_length": (48, "method=prefix: trained key and value vectors per layer and head", "> 0"),
    "lora_rank": (128, "LoRA rank on the q, k, v projections; 0 = full fine-tuning", ">= 0"),
    "lora_alpha": (512.0, "LoRA alpha: the update is scaled by alpha / rank", "> 0"),
    "lora_dropout": (0.05, "dropout on the input of the LoRA branch", "[0, 1)"),
    "dropout": (0.0, "dropout inside the transformer", "[0, 1)"),
    "learning_rate": (2.5e-4, "AdamW learning rate, constant", "> 0"),
    "max_iters": (80, "optimizer steps", "> 0"),
    "batch_size": (32, "examples per micro-batch (per process)", "> 0"),
    "gradient_accumulation_steps": (4, "micro-batches per step: batch_size x this = reviews per step", "> 0"),
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
    "dtype": ("auto", "auto (bfloat16, or float16 on GPUs without it; float32 on CPU)",
              ("auto", "float32", "bfloat16", "float16")),
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
SIZES = ("n_layer", "n_head", "n_embd", "block_size")  # init_from=scratch's; a pretrained model has its own
KEY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wandb_api.json")  # the homework's


def check_settings(config, explicit, resume, world):
    """What the flags tell before anything loads: sizes that cannot work, sources that are missing, a
    LoRA rank past the layers' width, a step that does not divide among the processes."""
    if config.n_embd % config.n_head:
        raise UsageError(f"n_embd={config.n_embd}: must be a multiple of n_head={config.n_head}")
    lora_flags = sorted(explicit & METHOD_SETTINGS["lora"])
    if config.init_from == "scratch" and (lora_flags or config.method != "lora"):
        given = ", ".join(lora_flags) or f"method={config.method}"
        raise UsageError(f"{given}: init_from=scratch trains every weight of a new model (LoRA and the other "
                         "methods adapt a pretrained one); drop the flag")
    others = sorted(explicit & other_methods_settings(config.method))
    if others:
        raise UsageError(f"{', '.join(others)}: not a setting of method={config.method}; drop the flag")
    if not config.dataset.strip():
        raise UsageError("dataset is empty: name a hub dataset or a local directory")
    step = config.batch_size * config.gradient_accumulation_steps
    if step % world:
        raise UsageError(f"batch_size x gradient_accumulation_steps = {step} reviews a step do not divide "
                         f"among {world} processes")
    saved = resume and resume["config"]["batch_size"] * resume["config"]["gradient_accumulation_steps"]
    if resume is not None and step != saved:
        raise UsageError(f"batch_size x gradient_accumulation_steps = {step} reviews a step, where the run "
                         f"took {saved}: it would repeat or skip reviews; resume with a product of {saved}")
    if config.init_from != "scratch" and (resume is None or resume["base"] is not None):
        with loading_weights("init_from", config.init_from):  # a missing directory or hub is found out now
            from transformers import GPT2Config
            pretrained = GPT2Config.from_pretrained(config.init_from)
        if config.method == "lora" and config.lora_rank > pretrained.n_embd:
            raise UsageError(f"lora_rank={config.lora_rank}: must be at most {pretrained.n_embd}, the width "
                             f"of {config.init_from}'s layers")
        if config.method == "prefix" and config.prefix_length >= pretrained.n_positions:
            raise UsageError(f"prefix_length={config.prefix_length}: must be less than the "
                             f"{pretrained.n_positions}-token context of {config.init_from}")
    check_source("dataset", config.dataset)
    get_tokenizer()  # its files are downloaded once: better to fail now than after loading data and model


def build_model(config, run):
    """The resumed run's model, GPT-2 with the method's layers (LoRA, adapters, prefixes) or without, or
    a small random GPT (init_from=scratch), with what trains marked."""
    if run.resume is not None:
        return load_model(run.resume, run.base and run.base["init_from"])
    if config.init_from == "scratch":
        return apply_method(GPT(GPTConfig(**{k: getattr(config, k) for k in SIZES}, dropout=config.dropout)))
    method = config.method  # its own settings; the other methods' are off
    adaptation = dict(dropout=config.dropout, method=method, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, lora_rank=config.lora_rank * (method == "lora"),
                      adapter_size=config.adapter_size * (method == "adapter"),
                      prefix_length=config.prefix_length * (method == "prefix"))
    with loading_weights("init_from", config.init_from):
        model = apply_method(GPT.from_pretrained(config.init_from, adaptation))
    if method == "prefix":  # its keys and values start as those of the instruction's tokens, repeated
        instruction = encode_prompt("", config.prompt_template)
        init_prefixes(model, (instruction * config.prefix_length)[:config.prefix_length])
    return model


def check_model(config, model, explicit):
    """What only the model tells: its sizes are the ones given (saved and printed as they are), and its
    context holds the prompt and its answer (generate.py's too, with eval_test)."""
    for key in SIZES:
        if key in explicit and getattr(config, key) != getattr(model.config, key):
            raise UsageError(f"{key}={getattr(config, key)}: {config.init_from} has {key}="
                             f"{getattr(model.config, key)}; only init_from=scratch takes the sizes given")
    for key in (*SIZES, "lora_rank", "adapter_size", "prefix_length"):  # saved and printed as the model has
        setattr(config, key, getattr(model.config, key))
    answer = generate.FLAGS["max_new_tokens"][0] if config.eval_test else 1
    check_prompt_room(config.prompt_template, model.context_length, answer, model_named(config))


def check_data(config, loader):
    """What only the data tells: a step's reviews fit in the train split, and most reviews fit the context."""
    step, reviews = config.batch_size * config.gradient_accumulation_steps, len(loader.examples["train"])
    if step > reviews:
        raise UsageError(f"batch_size x gradient_accumulation_steps = {step} reviews a step: more than the "
                         f"{reviews} of the train split")
    everything = sum(map(len, loader.examples.values()))
    if loader.truncated > everything / 2:
        raise UsageError(f"{loader.truncated} of {everything} reviews would be cut short to fit the "
                         f"{config.block_size - config.prefix_length}-token context of {model_named(config)}")


def model_named(config):
    if config.prefix_length:
        return f"init_from={config.init_from} beside prefix_length={config.prefix_length} (lower it)"
    return f"init_from={config.init_from}" + (" (raise block_size)" if config.init_from == "scratch" else "")


def unused_flags(config, explicit, saved):
    """The flags given to a finished run that differ from its own, which change nothing now, said so."""
    unused = [k for k in sorted(explicit - set(MACHINE) - {"resume", "init_from", "eval_test"})
              if getattr(config, k) != saved.get(k)]
    return (f"; {', '.join(f'{k}={getattr(config, k)!r}' for k in unused)} changed nothing (a larger "
            "max_iters continues the run; another out_dir starts a new one)") if unused else ""


def make_optimizer(model, config, device):
    """AdamW over the parameters that train, with weight decay on matrices only."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in trained if p.dim() >= 2], weight_decay=config.weight_decay),
              dict(params=[p for p in trained if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             fused=device.startswith("cuda"))


def restore(run, optimizer, scaler, device):
    """(iter_num, best_val_loss) to go on from: a resumed run's, with its AdamW and loss-scaler state (the
    hyperparameters given now win) and this process's random state; (0, inf) for a new run."""
    if run.resume is None:
        return 0, math.inf
    asked = [{k: group[k] for k in ("lr", "betas", "weight_decay")} for group in optimizer.param_groups]
    optimizer.load_state_dict(run.resume["optimizer"])
    for group, hyperparameters in zip(optimizer.param_groups, asked):
        group.update(hyperparameters)
    scaler.load_state_dict(run.resume["scaler"])
    rng = run.resume["rng"][run.rank]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"], device)
    return run.resume["iter_num"], run.resume["best_val_loss"]


@torch.no_grad()
def validation_loss(model, loader, config, ctx, progress=True):
    """Mean loss per target token over the validation split (eval mode: LoRA merged)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = torch.zeros((), device=device), 0
    batches = loader.batches("validation", config.eval_batch_size, config.eval_iters)
    for x, y, n_shared in tqdm(batches, desc="validation", unit="batch", leave=False, disable=not progress,
                             file=sys.stderr):
        with ctx:
            _, loss = model(x.to(device), y.to(device), "sum", n_shared if config.share_prefix else 0)
        total += loss.float()
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total.item() / count


def forward_backward(model, loader, scaler, iter_num, config, ctx):
    """Gradients of step iter_num + 1 over this process's share of its reviews; returns (loss, tokens)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    step_reviews = config.batch_size * config.gradient_accumulation_steps
    examples = loader.train_examples(iter_num * step_reviews, step_reviews)
    n_targets = sum(len(ids) - (n_prompt if config.mask_prompt else 1) for ids, n_prompt in examples)
    share = step_reviews // world
    # micro-batches of similar length pad less; the step's reviews, and so its update, stay the same
    micro = by_length(examples[rank * share:(rank + 1) * share], config.batch_size, lambda e: len(e[0]))
    step_loss, tokens = torch.zeros((), device=device), 0
    for batch in micro:
        x, y, n_shared = loader.collate(batch)
        tokens += x.numel()
        with ctx:
            _, loss = model(x.to(device), y.to(device), "sum", n_shared if config.share_prefix else 0)
        loss = loss / n_targets  # per target token of the whole step
        scaler.scale(loss).backward()
        step_loss += loss.detach()
    if world > 1:  # the step's loss and gradients: sums over every process's reviews
        dist.all_reduce(step_loss)
        for p in model.parameters():
            if p.requires_grad:
                dist.all_reduce(p.grad)
    return step_loss.item(), tokens * world


def clip_and_step(optimizer, scaler, grad_clip, iter_num):
    """Clip the gradients' norm (grad_clip 0: only measure it), step and clear them. A norm that is not
    finite would zero the update or make it nan: the run stops, except in float16, where the loss scaler
    skips such a step itself."""
    scaler.unscale_(optimizer)
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(trained, grad_clip or math.inf)
    if not scaler.is_enabled() and not torch.isfinite(norm):
        raise Diverged(f"the gradient norm is {norm.item()} at iteration {iter_num + 1}; checkpoints left as "
                       "they were")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train(model, loader, run, device, dtype):
    """nanoGPT's loop: evaluate and save, stop at max_iters, forward and backward, clip and step, log."""
    config, ctx = run.config, autocast(device, dtype)
    optimizer = make_optimizer(model, config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
    iter_num, best_val_loss = restore(run, optimizer, scaler, device)
    evaluated = iter_num if run.resume else -1  # a resumed iteration was evaluated before its save
    step_model = torch.compile(model) if config.compile else model
    if run.world > 1:  # every process starts from process 0's weights: each drew its own random ones
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.detach(), src=0)
    wandb_run = start_wandb(config) if run.master else None
    with tqdm(total=config.max_iters, initial=iter_num, desc="train", unit="step", disable=not run.master,
              file=sys.stderr) as bar:
        while True:
            # the validation loss at the start, every eval_interval steps and at the end; the checkpoints
            due = iter_num % config.eval_interval == 0 or iter_num == config.max_iters
            if due and iter_num != evaluated:
                t0 = time.time()
                val_loss = validation_loss(model, loader, config, ctx, progress=run.master)
                if not math.isfinite(val_loss):
                    raise Diverged(f"validation loss is {val_loss} at iteration {iter_num}; checkpoints "
                                   "left as they were")
                row = run.log(iter=iter_num, val_loss=val_loss, val_time=round(time.time() - t0, 3))
                if wandb_run:
                    wandb_run.log(row, step=iter_num)
                if run.master:
                    bar.write(f"iter {iter_num}: validation loss {val_loss:.4f}")
                    bar.start_t += time.time() - t0  # the bar's rate and ETA count training steps only
                    bar.last_print_t += time.time() - t0
                if val_loss < best_val_loss:  # ckpt.pt first: a kill between the writes leaves the older pair
                    best_val_loss = val_loss
                    run.save("ckpt.pt", model, iter_num, best_val_loss)
                run.save("ckpt_last.pt", model, iter_num, best_val_loss, optimizer, scaler)
            if iter_num == config.max_iters:
                break

            # one optimizer step over batch_size x gradient_accumulation_steps reviews
            t0 = time.time()
            off_evaluation = iter_num % config.eval_interval != 0  # an evaluation saves ckpt_last.pt anyway
            ckpt_due = config.ckpt_interval and iter_num % config.ckpt_interval == 0 and off_evaluation
            rng = rng_state(device) if ckpt_due else None  # before this step's dropout draws
            train_loss, tokens = forward_backward(step_model, loader, scaler, iter_num, config, ctx)
            if not math.isfinite(train_loss):
                raise Diverged(f"training loss is {train_loss} at iteration {iter_num + 1}; checkpoints "
                               "left as they were")
            if ckpt_due:  # the state whose loss has just proved finite, before the step changes it
                run.save("ckpt_last.pt", model, iter_num, best_val_loss, optimizer, scaler, rng)
            clip_and_step(optimizer, scaler, config.grad_clip, iter_num)
            iter_num += 1
            step_time = time.time() - t0
            row = run.log(iter=iter_num, train_loss=train_loss, lr=config.learning_rate, tokens=tokens,
                          step_time=round(step_time, 4))
            if wandb_run:
                wandb_run.log(row, step=iter_num)
            bar.set_postfix(train_loss=f"{train_loss:.4f}", tok_s=f"{tokens / step_time:,.0f}", refresh=False)
            bar.update()
    if wandb_run:
        wandb_run.finish()
    if run.master:
        print(f"done: iteration {iter_num} of {config.max_iters}, best validation loss {best_val_loss:.4f}\n"
              f"checkpoints: {run.file('ckpt.pt')} (best), {run.file('ckpt_last.pt')} (last); metrics.jsonl "
              "beside them")


def wandb_key():
    """WANDB_API_KEY, else the key in wandb_api.json (the template's empty key is none)."""
    try:
        with open(KEY_FILE, encoding="utf-8") as f:
            return os.environ.get("WANDB_API_KEY") or json.load(f).get("wandb_api_key") or ""
    except (OSError, ValueError, AttributeError) as e:
        if not isinstance(e, FileNotFoundError):
            print("warning: wandb_api.json is unreadable; ignoring it", file=sys.stderr)
        return os.environ.get("WANDB_API_KEY", "")


def start_wandb(config):
    """A wandb run (its files in wandb's own directory) where a key is configured or wandb_log is on,
    else None; a failure only warns."""
    if not (wandb_key() or config.wandb_log):
        print(f"no wandb key: logging locally to {os.path.join(config.out_dir, 'metrics.jsonl')}")
        return None
    try:
        import wandb
        if wandb_key():
            os.environ["WANDB_API_KEY"] = wandb_key()  # read by wandb itself; never printed or saved by us
        return wandb.init(project=config.wandb_project, config=vars(config),
                          name=config.wandb_run_name or os.path.basename(os.path.abspath(config.out_dir)))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        print(f"warning: wandb is unavailable ({type(e).__name__}: {reason}); logging locally only",
              file=sys.stderr)
        return None


def test_accuracy(model, loader, run, ctx):
    """The handout's accuracy lines for both checkpoints on the test split, as generate.py prints them
    by default, saved as the run's results."""
    checkpoints = run.checkpoints(("best", "last"))
    config = defaults(generate.FLAGS, prompt_template=run.config.prompt_template, dataset=run.config.dataset,
                      batch_size=run.config.eval_batch_size)
    rows, predictions = generate.evaluate(model, checkpoints, loader.records["test"], config, ctx)
    print(f"results: {generate.write_results(run, run.run_id, 'test', True, rows, predictions)}")


def distributed(device):
    """(rank, world size, device): torchrun's, where its WORLD_SIZE says there are several processes,
    else (0, 1, device). They join a process group only to train (process_group)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return 0, 1, device
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        found = ", ".join(f"{v}={os.environ.get(v)!r}" for v in ("WORLD_SIZE", "RANK"))
        raise UsageError(f"{found} and LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}: expected whole numbers, "
                         "as torchrun sets them") from None
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    return rank, world, device


@contextlib.contextmanager
def process_group(device, world):
    """torchrun's processes joined while they train, parted once all are done. Joined only after the
    model is loaded: a group up when transformers' model code is first imported outlives
    destroy_process_group, and its threads can abort the interpreter's exit."""
    if world == 1:
        yield
        return
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
        dist.barrier()  # every process is past its last collective before any leaves the group
    finally:
        dist.destroy_process_group()


def main(argv):
    config, explicit = parse_flags("train.py", FLAGS, argv, __doc__)
    with reported_errors("train.py", config.debug, also=(DataError,)):
        device, dtype = device_and_dtype(config.device, config.dtype)
        rank, world, device = distributed(device)
        with open_run(config, explicit, rank, world) as run:  # lock out_dir; resume its run or start afresh
            config = run.config
            config.wandb_log = config.wandb_log or bool(wandb_key())  # saved as it is in effect
            check_settings(config, explicit, run.resume, world)
            torch.manual_seed(config.seed + rank)
            records = load_rotten_tomatoes(config.dataset)  # bad data stops the run before the model loads
            run.data = fingerprint(records)
            if run.resume and run.resume.get("data") not in (None, run.data):
                raise UsageError(f"dataset={config.dataset!r} holds other reviews than the run trained on; "
                                 "resume it on its own data, or start a new run in another out_dir")
            model = build_model(config, run).to(device)
            check_model(config, model, explicit)
            loader = CustomDataLoader(records, model.context_length, config.prompt_template,
                                      config.mask_prompt, config.seed)
            check_data(config, loader)
            trainable, total = count_parameters(model)
            if run.master:  # one process of a torchrun speaks
                print("".join(f"{k} = {v!r}\n" for k, v in vars(config).items()) +
                      f"{config.init_from} on {device} ({dtype}); trainable parameters: {trainable:,} of "
                      f"{total:,} ({100 * trainable / total:.2f}%); {loader.truncated} reviews truncated to "
                      "fit")
            if run.master and run.resume and run.resume["iter_num"] == config.max_iters:
                print(f"{run.path} holds this run finished at iteration {config.max_iters}: nothing to train"
                      + unused_flags(config, explicit, run.resume["config"]))
            elif run.master and run.resume:
                print(f"resuming {run.path} at iteration {run.resume['iter_num']} of {config.max_iters}")
            with process_group(device, world):
                train(model, loader, run, device, dtype)
            if config.eval_test and run.master and not generate.is_tested(run.path):
                test_accuracy(model, loader, run, autocast(device, dtype))


if __name__ == "__main__":
    main(sys.argv[1:])
