"""Speed of training and evaluation: this project against Hugging Face transformers + PEFT, side by
side in one run, on random weights of the gpt2-medium shape (nothing to download).

    python -m tools.bench                # on the current device; prints a table, writes bench.json
    python -m tools.bench smoke=true     # a tiny model and a few steps: checks that it all runs

Both sides get the same weights and the same batches of real review lengths (from `dataset`, a local
directory with the three JSONL splits; synthetic reviews of the same lengths when it is missing).
"""
import json
import os
import sys
import tempfile
import time

import torch

import generate
import train
from dataloader import SPLITS, CustomDataLoader, draw_demonstrations, few_shot_prefix
from harness.checkpoints import base_fingerprint, checkpoint_of, save_checkpoint
from harness.device import autocast, device_and_dtype, device_name
from harness.flags import defaults, parse_flags
from harness.run import read_metrics
from lora import mark_only_lora_as_trainable
from finetune import apply_method
from model import GPT, GPTConfig
from tools.bench_table import peak_tflops, print_table, t4_projection, training_flops_per_token

FLAGS = {
    "smoke": (False, "a tiny model, a few steps and reviews: checks that the benchmark runs "
                     "(CPU, seconds)"),
    "dataset": (os.environ.get("ROTTEN_TOMATOES_DIR", ""),
                "local directory with train/validation/test.jsonl"),
    "shape": ("medium", "the model's shape: medium (gpt2-medium, 355 M) or gpt2 (124 M, which a CPU can run)",
              ("medium", "gpt2")),
    "parts": ("train,step,memory,evaluate,prompting,writes,end_to_end",
              "which measurements, comma-separated"),
    "shots": (8, "prompting: demonstrations before each review, against none"),
    "batch_size": (32, "reviews per training step (one micro-batch: train.py's)"),
    "steps": (10, "timed training steps"),
    "warmup": (3, "untimed training steps before them"),
    "eval_batch_size": (256, "reviews per batch for batched evaluation"),
    "one_at_a_time": (30, "reviews generated one at a time (the per-review time is measured on these)"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", "auto, float32, bfloat16 or float16"),
    "out": ("bench.json", "where the numbers go"),
}
MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024)
GPT2 = dict(n_layer=12, n_head=12, n_embd=768)
TINY = dict(n_layer=2, n_head=4, n_embd=64)
METHODS = {"BitFit": dict(method="bitfit"), "adapters, size 24": dict(method="adapter", adapter_size=24),
           "prefix tuning, 48 vectors": dict(method="prefix", prefix_length=48)}
PARTS = ("train", "step", "memory", "evaluate", "prompting", "writes", "end_to_end")


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def review_data(dataset):
    """The three splits, real when dataset names a local copy, else synthetic of similar lengths."""
    if dataset and os.path.isdir(dataset):
        return dataset
    generator = torch.Generator().manual_seed(0)
    words = ["good", "bad", "film", "story", "actors", "dull", "moving", "the", "a", "and", "is", ","]
    def review():
        n = int(torch.randint(8, 45, (1,), generator=generator))
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=generator))
    print("no local dataset: synthetic reviews of similar lengths")
    return {s: [dict(text=review(), label=i % 2) for i in range(n)]
            for s, n in zip(SPLITS, (1024, 256, 1066))}


def hf_and_ours(shape, lora_rank, device):
    """A random Hugging Face GPT-2 (+ PEFT LoRA on c_attn) and ours with the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    **shape))
    ours = GPT(GPTConfig(lora_rank=lora_rank, lora_alpha=4.0 * lora_rank, lora_dropout=0.05, **shape))
    ours.load_hf_state_dict(hf.state_dict())
    if lora_rank:
        from peft import LoraConfig, get_peft_model
        hf = get_peft_model(hf, LoraConfig(r=lora_rank, lora_alpha=4 * lora_rank, lora_dropout=0.05,
                                           target_modules=["c_attn"], fan_in_fan_out=True))
        mark_only_lora_as_trainable(ours)
    return hf.to(device), ours.to(device)


def hf_inputs(x, y):
    """HF shifts labels itself: one extra input column lets it score y's last position too. No attention
    mask, its fastest path: right padding cannot change a causal model's real positions."""
    pad = torch.nn.functional.pad
    return dict(input_ids=pad(x, (0, 1), value=50256), labels=pad(y, (1, 0), value=-100))


def time_training(model, batches, hf, device, dtype, warmup=3, share_prefix=True):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    model.train()
    losses = []
    def step(x, y, n_shared):
        with autocast(device, dtype):
            loss = (model(**hf_inputs(x, y)).loss if hf
                    else model(x, y, n_shared=n_shared if share_prefix else 0)[1])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    for batch in batches[:warmup]:
        step(*batch)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        losses.append(step(*batch))
    synchronize(device)
    seconds = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
    return seconds, memory, float(torch.stack(losses).float().mean())


def bench_training(shape, loader, config, device, dtype, name):
    rows = []
    n, warmup = config.batch_size, config.warmup
    examples = loader.train_examples(0, n * (config.steps + warmup))
    batches = [(x.to(device), y.to(device), n_shared) for x, y, n_shared in (
        loader.collate(sorted(examples[i:i + n], key=lambda e: len(e[0])))
        for i in range(0, len(examples), n))]
    tokens = sum(len(ids) - 1 for ids, _ in examples[warmup * n:])
    targets = sum(len(ids) - p for ids, p in examples[warmup * n:])
    for rank, label in ((128, "LoRA r=128"), (0, "full fine-tuning")):
        hf, ours = hf_and_ours(shape, rank, device)
        timed_reviews = len(examples) - warmup * n
        flops = training_flops_per_token(shape, rank, tokens / timed_reviews, targets / timed_reviews)
        # ours with the reviews' common start computed once per micro-batch, and once per review, as before
        sides = (("ours", ours, True), ("ours, no sharing", ours, False),
                 ("transformers+peft" if rank else "transformers", hf, None))
        for who, model, share in sides:
            torch.manual_seed(0)  # the same dropout draws for every side
            seconds, memory, loss = time_training(model, batches, model is hf, device, dtype, warmup, share)
            peak = peak_tflops(name)
            rows.append(dict(what=f"train {label}", who=who, tokens_per_s=tokens / seconds,
                             reviews_per_s=config.steps * n / seconds, step_ms=1000 * seconds / config.steps,
                             peak_memory_gib=memory, loss=loss,
                             mfu=flops * tokens / seconds / (peak * 1e12) if peak else None))
        for row in rows[-3:-1]:
            row["speedup"] = row["tokens_per_s"] / rows[-1]["tokens_per_s"]
        del hf, ours
    for label, settings in METHODS.items():  # the other methods, ours alone, on the same batches
        torch.manual_seed(0)
        model = apply_method(GPT(GPTConfig(**shape, **settings))).to(device)
        seconds, memory, loss = time_training(model, batches, False, device, dtype, warmup)
        rows.append(dict(what=f"train {label}", who="ours", tokens_per_s=tokens / seconds, loss=loss,
                         reviews_per_s=config.steps * n / seconds, step_ms=1000 * seconds / config.steps,
                         peak_memory_gib=memory))
    return rows


def bench_train_step(shape, loader, config, device, dtype):
    """train.py's own step (length-grouped micro-batches, clipping, AdamW) for LoRA r=128 with the
    step's reviews split into micro-batches of several sizes: the same update at different speeds."""
    defaults_now = defaults(train.FLAGS)
    per_step = 8 if config.smoke else defaults_now.batch_size * defaults_now.gradient_accumulation_steps
    torch.manual_seed(0)
    model = GPT(GPTConfig(lora_rank=128, lora_alpha=512.0, lora_dropout=0.05, **shape))
    model = mark_only_lora_as_trainable(model).to(device).train()
    warmup, steps = 2, config.steps
    tokens = sum(len(ids) - 1 for ids, _ in loader.train_examples(warmup * per_step, steps * per_step))
    rows = []
    for size in (per_step // 4, per_step // 2, per_step):
        c = defaults(train.FLAGS, lora_rank=128, lora_alpha=512.0, batch_size=size,
                     gradient_accumulation_steps=per_step // size)
        what = f"train.py step of {per_step} reviews as {per_step // size} x {size}"
        optimizer = train.make_optimizer(model, c, device)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == "float16")
        try:
            for i in range(warmup + steps):
                if i == warmup:
                    if device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats(device)
                    synchronize(device)
                    start = time.perf_counter()
                train.forward_backward(model, loader, scaler, i, c, autocast(device, dtype))
                train.clip_and_step(optimizer, scaler, c.grad_clip, i)
            synchronize(device)
        except torch.cuda.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            rows.append(dict(what=what, who="ours", skipped="out of memory"))
            continue
        finally:
            del optimizer
        seconds = time.perf_counter() - start
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
        rows.append(dict(what=what, who="ours", tokens_per_s=tokens / seconds, step_ms=1000 * seconds / steps,
                         peak_memory_gib=memory))
    return rows


def bench_activation_memory(shape, loader, device, dtype):
    """Bytes the forward pass keeps for the backward pass, per review of the longest prompts, counted
    from the saved tensors (not the allocator): what bounds the micro-batch a card can hold. The
    reviews' common start (the instruction), computed once per micro-batch, counts in the fixed part."""
    longest = sorted(loader.examples["train"], key=lambda e: len(e[0]))[-4:]  # distinct, as in a batch
    rows = []
    for rank, dropout, label in ((128, 0.0, "LoRA r=128"), (0, 0.05, "full fine-tuning, dropout 0.05")):
        torch.manual_seed(0)  # the dropouts of train.py's default run and of the homework's full run
        model = GPT(GPTConfig(lora_rank=rank, lora_alpha=4.0 * rank, lora_dropout=0.05, dropout=dropout,
                              **shape))
        model = (mark_only_lora_as_trainable(model) if rank else model).to(device).train()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        for share, who in ((True, "ours"), (False, "ours, no sharing")):
            saved = []
            for n in (2, 4):
                storages = {}

                def keep(t):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in weights:
                        storages[storage.data_ptr()] = storage.nbytes()
                    return t
                x, y, n_shared = loader.collate(longest[-n:])
                with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast(device, dtype):
                    model(x.to(device), y.to(device), n_shared=n_shared if share else 0)
                saved.append(sum(storages.values()))
            per_review = (saved[1] - saved[0]) / 2
            rows.append(dict(what=f"saved for backward, {label}", who=who,
                             tokens_per_review=len(longest[-1][0]) - 1, mib_per_review=per_review / 2**20,
                             fixed_mib=(saved[0] - 2 * per_review) / 2**20))
    return rows


def bench_evaluation(shape, loader, config, device, dtype):
    hf, ours = hf_and_ours(shape, 128, device)
    hf, ours = hf.merge_and_unload().eval(), ours.eval()
    records = loader.records["test"]
    validation_reviews = len(loader.examples["validation"])
    prompts = [ids[:p] for ids, p in loader.examples["test"]]
    rows = []

    def seconds(work):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        return time.perf_counter() - start
    for share, who in ((True, "ours"), (False, "ours, no sharing")):  # common start once per batch, or not
        validation = defaults(train.FLAGS, share_prefix=share)
        settings = defaults(generate.FLAGS, batch_size=config.eval_batch_size, share_prefix=share)
        rows.append(dict(what=f"evaluate {len(records)} reviews, batched", who=who, seconds=seconds(
            lambda: generate.predict_labels(ours, records, "generate", settings, autocast(device, dtype)))))
        rows.append(dict(what=f"validation loss, {validation_reviews} reviews", who=who, seconds=seconds(
            lambda: train.validation_loss(ours, loader, validation, autocast(device, dtype)))))
    ours.eval()

    def hf_generate(batch):
        T = max(map(len, batch))
        ids = torch.tensor([[50256] * (T - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad(), autocast(device, dtype):
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                        pad_token_id=50256)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    start = time.perf_counter()
    for i in range(0, len(order), config.eval_batch_size):
        hf_generate([prompts[j] for j in order[i:i + config.eval_batch_size]])
    synchronize(device)
    rows.append(dict(what=f"evaluate {len(records)} reviews, batched", who="transformers",
                     seconds=time.perf_counter() - start))
    for who, one in (("ours", lambda p: ours.generate_batch([p], 5)),
                     ("transformers", lambda p: hf_generate([p]))):
        start = time.perf_counter()
        for p in prompts[:config.one_at_a_time]:
            one(p)
        synchronize(device)
        per_review = (time.perf_counter() - start) / config.one_at_a_time
        rows.append(dict(what=f"evaluate one review at a time (mean of {config.one_at_a_time})", who=who,
                         seconds=per_review, ms_per_review=1000 * per_review))
    return rows


def bench_prompting(shape, loader, config, device, dtype):
    """The test split's evaluation with config.shots demonstrations before each review against none (method
    logprob and generate): the demonstrations, the same in every row, are computed once per batch and
    never copied per row."""
    _, ours = hf_and_ours(shape, 0, device)
    splits = {split: loader.records[split] for split in SPLITS}
    prefix = few_shot_prefix([splits["train"][i] for i in draw_demonstrations(splits, config.shots, 0)])
    records, rows = loader.records["test"], []
    for method in ("logprob", "generate"):
        seconds = {}
        for shots in (0, config.shots):
            settings = defaults(generate.FLAGS, batch_size=config.eval_batch_size)
            synchronize(device)
            start = time.perf_counter()
            generate.predict_labels(ours, records, method, settings, autocast(device, dtype),
                                    prefix if shots else "")
            synchronize(device)
            seconds[shots] = time.perf_counter() - start
            rows.append(dict(what=f"{method} {len(records)} reviews, {shots}-shot", who="ours",
                             seconds=seconds[shots], cost_vs_zero_shot=seconds[shots] / seconds[0]))
    return rows


def bench_checkpoint_writes(shape, repeats=2):
    """What an improving evaluation writes for LoRA r=128 (ckpt.pt, then ckpt_last.pt), against the
    layout that stored the whole model with its optimizer in ckpt.pt: seconds and megabytes, to disk."""
    torch.manual_seed(0)
    model = mark_only_lora_as_trainable(GPT(GPTConfig(lora_rank=128, lora_alpha=512.0, **shape)))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained)
    for p in trained:
        p.grad = torch.randn_like(p)
    optimizer.step()  # AdamW state exists, as at any evaluation after the first
    best = checkpoint_of(model, dict(init_from="bench", fingerprint=base_fingerprint(model)))
    resume = dict(optimizer=optimizer.state_dict(), rng=torch.get_rng_state())
    layouts = {
        "adapters": lambda: [best, dict(best, **resume)],
        "whole model (the layout before)": lambda: [
            dict(model=model.state_dict(), **resume),
            dict(model={n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, **resume)]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for who, files in layouts.items():
            start = time.perf_counter()
            for _ in range(repeats):
                for name, checkpoint in zip(("ckpt.pt", "ckpt_last.pt"), files()):
                    save_checkpoint(os.path.join(tmp, name), checkpoint)
            seconds = (time.perf_counter() - start) / repeats
            megabytes = sum(os.path.getsize(os.path.join(tmp, n)) for n in ("ckpt.pt", "ckpt_last.pt")) / 1e6
            rows.append(dict(what="checkpoint writes of an improving evaluation, LoRA r=128", who=who,
                             seconds=seconds, megabytes=megabytes))
    return rows


def bench_end_to_end(shape, dataset, config, device):
    """One default experiment: 80 steps with evaluations, then test accuracy of both checkpoints."""
    if not isinstance(dataset, str):
        return [dict(what="default experiment end to end", who="ours",
                     skipped="needs a local dataset directory")]
    from transformers import GPT2Config, GPT2LMHeadModel
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(GPT2Config(n_positions=1024, **shape)).save_pretrained(os.path.join(tmp, "model"))
        flags = [f"init_from={tmp}/model", f"dataset={dataset}", f"out_dir={tmp}/run", f"device={device}"]
        if config.smoke:
            flags += ["max_iters=2", "batch_size=8", "gradient_accumulation_steps=1", "eval_iters=2",
                      "lora_rank=8"]
        start = time.perf_counter()
        train.main(flags)
        seconds = time.perf_counter() - start
        metrics = read_metrics(os.path.join(tmp, "run", "metrics.jsonl"))
    # where the time went: the training loop (steps, validation, the rest: checkpoint writes and
    # logging), and outside it (imports aside: building the model, the last checkpoints, test accuracy)
    steps = sum(r.get("step_time", 0.0) for r in metrics)
    validation = sum(r.get("val_time", 0.0) for r in metrics)
    loop = metrics[-1]["elapsed"]
    return [dict(what="default experiment end to end", who="ours", seconds=seconds, loop_s=loop,
                 train_steps_s=steps, validation_s=validation, loop_rest_s=loop - steps - validation)]


def main(argv):
    config, _ = parse_flags("bench.py", FLAGS, argv, __doc__)
    if config.smoke:
        vars(config).update(batch_size=8, steps=2, warmup=1, eval_batch_size=16, one_at_a_time=2)
    device, dtype = device_and_dtype(config.device, config.dtype)
    name = device_name(device)
    shape = TINY if config.smoke else GPT2 if config.shape == "gpt2" else MEDIUM
    parts = set(config.parts.split(","))
    if parts - set(PARTS):
        raise SystemExit(f"bench.py: error: parts={config.parts!r}: expected some of {', '.join(PARTS)}")
    dataset = review_data(config.dataset)
    loader = CustomDataLoader(dataset)
    if config.smoke:
        for by_split in (loader.records, loader.examples):
            by_split["test"] = by_split["test"][:24]
    print(f"bench on {name} ({dtype}), model {shape}, torch {torch.__version__}")
    rows = bench_training(shape, loader, config, device, dtype, name) if "train" in parts else []
    rows += bench_train_step(shape, loader, config, device, dtype) if "step" in parts else []
    rows += bench_activation_memory(shape, loader, device, dtype) if "memory" in parts else []
    rows += bench_evaluation(shape, loader, config, device, dtype) if "evaluate" in parts else []
    rows += bench_prompting(shape, loader, config, device, dtype) if "prompting" in parts else []
    rows += bench_checkpoint_writes(shape) if "writes" in parts else []
    rows += bench_end_to_end(shape, dataset, config, device) if "end_to_end" in parts else []
    train_ids = loader.examples["train"]
    rows += t4_projection(rows, name, sum(len(ids) - 1 for ids, _ in train_ids) / len(train_ids))
    print_table(rows)
    result = dict(device=name, dtype=dtype, torch=torch.__version__, shape=shape, settings=vars(config),
                  rows=rows, date=time.strftime("%Y-%m-%d"))
    with open(config.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {config.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
