"""Test accuracy of a run's checkpoints, or zero-shot accuracy of a raw GPT-2.

    python generate.py out_dir=runs/r16_a64            # the Best Val and Last Iter checkpoints
    python generate.py init_from=gpt2-medium           # zero-shot
    python generate.py out_dir=runs/r16_a64 text="an utterly charming film"   # classify your own reviews
"""
import json
import sys
import time

import torch

import runs
from configurator import autocast, device_and_dtype, parse_flags
from dataloader import (LABEL_WORDS, PROMPT_TEMPLATES, by_length, check_prompt_room, encode_prompt, get_tokenizer,
                        load_rotten_tomatoes, sample)
from model import GPT

FLAGS = {  # name: (default, help[, allowed values])
    "init_from": ("resume", "'resume': the checkpoints in out_dir; or gpt2, gpt2-medium, ..., a hub id or a local Hugging Face GPT-2 directory (zero-shot)"),
    "out_dir": ("out", "where the checkpoints are; results.json and predictions.json go here"),
    "ckpt": ("", "init_from=resume: best (ckpt.pt), last (ckpt_last.pt) or both; default: both, or best with text or file", ("", "best", "last", "both")),
    "base": ("", "a LoRA run's base model where it is no longer at the run's init_from (a name or directory)"),
    "text": ([], "classify this review instead of a split (repeat the flag for more)"),
    "file": ("", "classify each line of this file instead of a split ('-' = standard input)"),
    "dataset": ("rotten_tomatoes", "hub name or local directory with train/validation/test.jsonl; init_from=resume: the run's unless given"),
    "split": ("test", "the split to evaluate", ("test", "validation")),
    "num_examples": (0, "evaluate N reviews of the split drawn at random (the same N every time); 0 = all", ">= 0"),
    "prompt_template": ("default", "init_from=resume: the run's unless given", tuple(PROMPT_TEMPLATES)),
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
NEAR_START = 20  # characters: the handout looks for the label in the first few characters of the answer


def parse_label(continuation, rule="near_start"):
    """1 for positive, 0 for negative, -1 for anything else. near_start (the handout's reading): the
    first of "positive" and "negative", in any case, beginning within the first 20 characters, so
    ' "positive"' and " not positive" are 1. first_word: the first word must be one of the two."""
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
    """Each record with continuation and prediction (1, 0 or -1): generate reads the label off up to
    max_new_tokens tokens (<|endoftext|> ends them); logprob takes the likelier label and adds p_positive."""
    model.eval()  # merges LoRA into the weights
    enc = get_tokenizer()
    generated = max_new_tokens if method == "generate" else 0
    check_prompt_room(prompt_template, model.config.block_size, generated)
    prompts = [encode_prompt(r["text"], prompt_template, model.config.block_size - generated) for r in records]
    positive_id, negative_id = (enc.encode_ordinary(LABEL_WORDS[label])[0] for label in (1, 0))
    out = [dict(text=r["text"], label=r["label"]) for r in records]
    batches = by_length(range(len(prompts)), batch_size, lambda i: len(prompts[i]))
    for batch in runs.progress(batches, f"{method} {len(records)} reviews"):
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
    return {k: getattr(config, k) for k in ("prompt_template", "max_new_tokens", "temperature", "top_k", "parse",
                                            "batch_size")}


def evaluate(model, checkpoints, records, config, device, dtype):
    """The handout's line for each checkpoint (its tensors loaded into model) and method; (rows, predictions)."""
    rows, sets = [], []
    for name, checkpoint in checkpoints:
        if checkpoint is not None:  # LoRA unmerged first (train mode), then this checkpoint's A and B
            runs.load_trained(model, checkpoint)
        for method in ("generate", "logprob") if config.method == "both" else (config.method,):
            start = time.time()
            preds = predict_labels(model, records, method, device=device, dtype=dtype, **options(config))
            seconds, summary = time.time() - start, summarize(preds)
            parse = config.parse if method == "generate" else None
            tag = f" [{method}]" if method == "logprob" else (f" [{parse}]" if parse != "near_start" else "")
            print(f"{report_line(name + tag, summary)}\n  {len(records)} reviews in {seconds:.1f} s "
                  f"({len(records) / seconds:.1f} reviews/s)")
            rows.append(dict(checkpoint=name, iter_num=checkpoint and checkpoint["iter_num"], method=method, parse=parse,
                             seconds=round(seconds, 3), **summary,
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
            label = {1: "positive", 0: "negative", -1: "unparseable"}[answer["prediction"]]
            print(f"{label:<11}  p(positive)={score['p_positive']:.3f}  "
                  f"answer={json.dumps(answer['continuation'])}  {answer['text']}")


def main(argv):
    config, explicit = parse_flags("generate.py", FLAGS, argv, __doc__)
    with runs.reported_errors("generate.py", config.debug):
        device, dtype = device_and_dtype(config.device, config.dtype)
        torch.manual_seed(config.seed)
        texts = runs.read_reviews(config.text, config.file)  # none unless text= or file= is given
        with runs.hold(config.out_dir, "generate.py", create=not texts, lock=config.init_from == "resume" or not texts) as run:
            if config.init_from == "resume":  # one model of the run's base, each checkpoint's tensors in turn
                model, checkpoints = run.load_checkpoints(config, explicit)  # and the run's dataset and template
            else:  # zero-shot
                with runs.loading_weights("init_from", config.init_from):
                    model, checkpoints = GPT.from_pretrained(config.init_from), [("Zero-shot " + config.init_from, None)]
            model.to(device)
            if texts:
                return classify(model, checkpoints, texts, config, device, dtype)
            runs.check_source("dataset", config.dataset)
            records = sample(load_rotten_tomatoes(config.dataset)[config.split], config.num_examples)
            rows, sets = evaluate(model, checkpoints, records, config, device, dtype)
            print(f"wrote {run.write_results(rows, sets, config)} and its predictions")
            return rows


if __name__ == "__main__":
    main(sys.argv[1:])
