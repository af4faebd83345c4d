"""Test accuracy of a run's checkpoints, or zero-shot accuracy of a raw GPT-2.

    python generate.py out_dir=runs/r16_a64            # Best Val and Last Iter checkpoints
    python generate.py init_from=gpt2-medium           # zero-shot
    python generate.py method=both                     # also compare the label probabilities
    python generate.py out_dir=runs/r16_a64 text="an utterly charming film"   # classify your own reviews
"""
import json
import sys
import time

import torch
from tqdm.auto import tqdm

import runs
from configurator import autocast, device_and_dtype, parse_flags
from dataloader import (LABEL_WORDS, PROMPT_TEMPLATES, by_length, check_prompt_room, encode_prompt, get_tokenizer,
                        load_rotten_tomatoes, sample)
from model import GPT

FLAGS = {  # name: (default, help[, allowed values])
    "init_from": ("resume", "'resume': the checkpoints in out_dir; or gpt2, gpt2-medium, ..., a hub id or a local Hugging Face GPT-2 directory (zero-shot)"),
    "out_dir": ("out", "where the checkpoints are; results.json and predictions.json go here"),
    "ckpt": ("both", "init_from=resume: best (ckpt.pt), last (ckpt_last.pt) or both (with text or file: best)", ("best", "last", "both")),
    "base": ("", "a LoRA run's base model where it is no longer at the run's init_from (a name or directory)"),
    "text": ([], "classify this review instead of a split (repeat the flag for more)"),
    "file": ("", "classify each line of this file instead of a split ('-' = standard input)"),
    "dataset": ("", "hub name or local directory with train/validation/test.jsonl; default: the checkpoint's, else rotten_tomatoes"),
    "split": ("test", "the split to evaluate", ("test", "validation")),
    "num_examples": (0, "evaluate N reviews of the split drawn at random (the same N every time); 0 = all", ">= 0"),
    "prompt_template": ("", "default: the checkpoint's, else default", ("",) + tuple(PROMPT_TEMPLATES)),
    "method": ("generate", "generate: read the label off a few generated tokens, as the handout does; logprob: the likelier of ' positive' and ' negative' after the prompt (it always answers); both", ("generate", "logprob", "both")),
    "max_new_tokens": (5, "tokens generated per review (fewer where the answer ends)", "> 0"),
    "parse": ("near_start", "how an answer is read: near_start (the first of positive/negative within its first 20 characters, as the handout reads it) or first_word (its first word must be one)", ("near_start", "first_word")),
    "temperature": (0.0, "0 = greedy (the default: accuracy must not depend on luck)", ">= 0"),
    "top_k": (0, "with temperature > 0, sample from the k most likely tokens; 0 = all", ">= 0"),
    "seed": (1337, "random seed for sampling", "[0, 2**32)"),
    "batch_size": (64, "reviews per batch", "> 0"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", "auto, float32, bfloat16 or float16", ("auto", "float32", "bfloat16", "float16")),
    "debug": (False, "show full tracebacks"),
}
LABEL_NAMES = {1: "positive", 0: "negative", -1: "unparseable"}
NEAR_START = 20  # characters: the handout looks for the label in the first few characters of the answer


def parse_label(continuation, rule="near_start"):
    """1 for positive, 0 for negative, -1 for anything else: the one place an answer is read.
    near_start (the handout's reading): whichever of "positive" and "negative", in any case, begins
    first within the first 20 characters, so ' "positive"', "\n\npositive" and " not positive" are 1.
    first_word: the first word after white space must be one of the two: " Positive!" is 1,
    " positively", " not positive" and ' "positive"' are -1."""
    if rule == "first_word":
        word = (continuation.split() or [""])[0]
        letters = next((i for i, ch in enumerate(word) if not ch.isalpha()), len(word))
        return {"positive": 1, "negative": 0}.get(word[:letters].lower(), -1)
    text = continuation.lower()
    found = [(text.find(word), label) for word, label in (("positive", 1), ("negative", 0)) if word in text]
    start, label = min(found, default=(NEAR_START, -1))
    return label if start < NEAR_START else -1


@torch.no_grad()
def predict_labels(model, records, method="generate", *, prompt_template="default", max_new_tokens=5, temperature=0.0,
                   top_k=0, parse="near_start", batch_size=64, device="cpu", dtype="float32", share_prefix=True):
    """One record per review: text, label, continuation and prediction (1, 0 or -1). method=generate
    reads the label off up to max_new_tokens generated tokens (fewer where <|endoftext|> ends them);
    method=logprob compares " positive" with " negative" after the prompt and adds p_positive."""
    model.eval()  # merges LoRA into the weights
    enc = get_tokenizer()
    generated = max_new_tokens if method == "generate" else 0
    check_prompt_room(prompt_template, model.config.block_size, generated)
    prompts = [encode_prompt(r["text"], prompt_template, model.config.block_size - generated) for r in records]
    positive_id, negative_id = (enc.encode_ordinary(LABEL_WORDS[label])[0] for label in (1, 0))
    out = [dict(text=r["text"], label=r["label"]) for r in records]
    for batch in tqdm(by_length(range(len(prompts)), batch_size, lambda i: len(prompts[i])), leave=False,
                      desc=f"{method} {len(records)} reviews", unit="batch", file=sys.stderr):
        with autocast(device, dtype):
            if method == "generate":
                new = model.generate_batch([prompts[i] for i in batch], max_new_tokens, temperature, top_k or None,
                                           stop_tokens=(enc.eot_token,), share_prefix=share_prefix)
                for i, tokens in zip(batch, new):
                    out[i]["continuation"] = enc.decode([t for t in tokens if t != enc.eot_token])
                    out[i]["prediction"] = parse_label(out[i]["continuation"], parse)
            else:
                logits = model.prefill([prompts[i] for i in batch], share_prefix)[0].float()
                difference = logits[:, positive_id] - logits[:, negative_id]
                for i, d, p in zip(batch, difference.tolist(), torch.sigmoid(difference).tolist()):
                    out[i].update(continuation=LABEL_WORDS[int(d > 0)], prediction=int(d > 0), p_positive=p)
    return out


def summarize(predictions):
    """Accuracy and counts; an unparseable answer (-1) counts as wrong."""
    correct = sum(p["prediction"] == p["label"] for p in predictions)
    return dict(accuracy=correct / len(predictions), positive=sum(p["prediction"] == 1 for p in predictions),
                negative=sum(p["prediction"] == 0 for p in predictions), correct=correct,
                unparseable=sum(p["prediction"] == -1 for p in predictions), total=len(predictions))


def report_line(name, s):
    return (f"{name} || Accuracy: {s['accuracy']:.4f}, Positive Predictions: {s['positive']}, "
            f"Negative Predictions: {s['negative']}, Correct Predictions: {s['correct']}, "
            f"Unparseable: {s['unparseable']}")


def options(config):  # predict_labels' settings among the flags
    return {k: getattr(config, k) for k in ("prompt_template", "max_new_tokens", "temperature", "top_k", "parse", "batch_size")}


def evaluate(model, checkpoints, records, config, device, dtype):
    """The handout's line for each checkpoint (its trained tensors loaded into model) and method;
    returns (results rows, prediction sets)."""
    rows, sets = [], []
    for name, checkpoint in checkpoints:
        if checkpoint is not None:
            runs.load_trained(model, checkpoint)
        for method in ("generate", "logprob") if config.method == "both" else (config.method,):
            start = time.time()
            preds = predict_labels(model, records, method, device=device, dtype=dtype, **options(config))
            seconds, summary = time.time() - start, summarize(preds)
            parse = config.parse if method == "generate" else None
            tag = f" [{method}]" if method == "logprob" else (f" [{parse}]" if parse != "near_start" else "")
            print(f"{report_line(name + tag, summary)}\n  {len(records)} reviews in {seconds:.1f} s "
                  f"({len(records) / seconds:.1f} reviews/s)")
            rows.append(dict(checkpoint=name, method=method, parse=parse, seconds=round(seconds, 3), **summary,
                             settings=dict(vars(config), device=runs.device_name(device))))
            sets.append(dict(checkpoint=name, method=method, parse=parse, records=preds))
    return rows, sets


def classify(model, checkpoints, texts, config, device, dtype):
    """Print, for each review, the label read off the generated answer, p(positive) and the answer."""
    records = [dict(text=t, label=None) for t in texts]
    for name, checkpoint in checkpoints:
        if checkpoint is not None:
            runs.load_trained(model, checkpoint)
        if len(checkpoints) > 1:
            print(name)
        answers, scores = (predict_labels(model, records, method, device=device, dtype=dtype, **options(config))
                           for method in ("generate", "logprob"))
        for answer, score in zip(answers, scores):
            print(f"{LABEL_NAMES[answer['prediction']]:<11}  p(positive)={score['p_positive']:.3f}  "
                  f"answer={json.dumps(answer['continuation'])}  {answer['text']}")


def test_accuracy(model, run, records, device, dtype):
    """train.py's last step: the test accuracy of the run's two checkpoints, as generate.py's default."""
    c = run.config
    config, _ = parse_flags("generate.py", FLAGS, [f"out_dir={c.out_dir}", f"dataset={c.dataset}", f"seed={c.seed}",
                                                   f"prompt_template={c.prompt_template}", f"batch_size={c.eval_batch_size}"])
    rows, sets = evaluate(model, run.checkpoints(("best", "last")), records, config, device, dtype)
    print(f"results: {run.write_results(rows, sets, config)} and predictions.json")


def main(argv):
    config, explicit = parse_flags("generate.py", FLAGS, argv, __doc__)
    with runs.reported_errors("generate.py", config.debug):
        device, dtype = device_and_dtype(config.device, config.dtype)
        torch.manual_seed(config.seed)
        own_reviews = bool(config.text or config.file)
        if own_reviews and "ckpt" not in explicit:
            config.ckpt = "best"
        texts = runs.read_reviews(config.text, config.file) if own_reviews else None
        with runs.hold(config.out_dir, "generate.py", create=not own_reviews) as run:
            if config.init_from == "resume":  # the run's checkpoints: one base model, their tensors loaded in turn
                model, checkpoints = run.load_checkpoints(("best", "last") if config.ckpt == "both" else (config.ckpt,),
                                                          config.base)
            else:  # zero-shot
                runs.check_source("init_from", config.init_from)
                with runs.loading_weights("init_from", config.init_from):
                    model, checkpoints = GPT.from_pretrained(config.init_from), [("Zero-shot " + config.init_from, None)]
            trained_with = checkpoints[0][1]["config"] if config.init_from == "resume" else {}
            config.dataset = config.dataset or trained_with.get("dataset", "rotten_tomatoes")
            config.prompt_template = config.prompt_template or trained_with.get("prompt_template", "default")
            model.to(device)
            if own_reviews:
                return classify(model, checkpoints, texts, config, device, dtype)
            runs.check_source("dataset", config.dataset)
            records = load_rotten_tomatoes(config.dataset)[config.split]
            if config.num_examples > len(records):
                print(f"num_examples={config.num_examples} is more than the {len(records)} {config.split} examples; "
                      "using all of them")
            rows, sets = evaluate(model, checkpoints, sample(records, config.num_examples), config, device, dtype)
            print(f"wrote {run.write_results(rows, sets, config)} and its predictions")
            return rows


if __name__ == "__main__":
    main(sys.argv[1:])
