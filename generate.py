"""Test accuracy of a run's checkpoints, or zero-shot accuracy of a raw GPT-2.

    python generate.py out_dir=runs/r16_a64                   # the Best Val and Last Iter checkpoints
    python generate.py init_from=gpt2-medium                  # zero-shot
    python generate.py out_dir=runs/r16_a64 text="an utterly charming film"   # classify your own reviews
    python generate.py init_from=gpt2-medium shots=4 method=logprob calibrate=true   # few-shot, calibrated
"""
import math
import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from dataloader import (CONTENT_FREE, LABEL_WORDS, PROMPT_TEMPLATES, DataError, by_length,
                        check_demonstrations_fit, check_prompt_room, common_start, draw_demonstrations,
                        encode_prompt, few_shot_prefix, get_sentiment_prompt, get_tokenizer,
                        load_rotten_tomatoes, sample)
from harness.checkpoints import (check_source, load_checkpoint, load_model, load_trained, loading_weights,
                                 read_json)
from harness.device import autocast, device_and_dtype, device_name
from harness.flags import UsageError, parse_flags, reported_errors
from harness.run import CHECKPOINTS, OutDir
from model import GPT

FLAGS = {  # name: (default, help[, allowed values])
    "init_from": ("resume", "'resume': the checkpoints in out_dir; or gpt2, gpt2-medium, ..., a hub id or a "
                            "local Hugging Face GPT-2 directory (zero-shot)"),
    "out_dir": ("out", "where the checkpoints are; the results go here (results.json)"),
    "ckpt": ("", "init_from=resume: best (ckpt.pt), last (ckpt_last.pt) or both; default: both, or best with "
                 "text or file", ("", "best", "last", "both")),
    "base": ("", "a LoRA run's base model where it is no longer at the run's init_from (name or directory)"),
    "text": ([], "classify this review instead of a split (repeat the flag for more)"),
    "file": ("", "classify each line of this file instead of a split ('-' = standard input)"),
    "dataset": ("rotten_tomatoes", "hub name or local directory with train/validation/test.jsonl; "
                                   "init_from=resume: the run's unless given"),
    "split": ("test", "the split to evaluate", ("test", "validation")),
    "num_examples": (0, "evaluate N reviews of the split drawn at random (the same every time); 0 = all",
                     ">= 0"),
    "prompt_template": ("default", "init_from=resume: the run's unless given", tuple(PROMPT_TEMPLATES)),
    "method": ("generate", "generate: read the label off a few generated tokens, as the handout does; "
                           "logprob: the likelier of ' positive' and ' negative' after the prompt (it always "
                           "answers); both", ("generate", "logprob", "both")),
    "max_new_tokens": (5, "tokens generated per review (fewer where the answer ends)", "> 0"),
    "parse": ("near_start", "how an answer is read: near_start (the first of positive/negative within "
                            "its first 20 characters, as the handout reads it) or first_word (its first word "
                            "must be one)", ("near_start", "first_word")),
    "temperature": (0.0, "0 = greedy (the default: accuracy must not depend on luck)", ">= 0"),
    "top_k": (0, "with temperature > 0, sample from the k most likely tokens; 0 = all", ">= 0"),
    "shots": (0, "few-shot prompting: this many labelled train reviews (demonstrations) before each review, "
                 "half of each label; 0 = none", ">= 0"),
    "shot_seed": (0, "which demonstrations are drawn, and their order", "[0, 2**32)"),
    "calibrate": (False, "contextual calibration of method=logprob (and of both's logprob rows): a second "
                         "row beside each, its label probabilities divided by those of content-free reviews "
                         "in the same prompt; method=generate has none"),
    "show_prompt": (False, "print the first review's whole prompt before evaluating"),
    "seed": (1337, "random seed for sampling", "[0, 2**32)"),
    "batch_size": (64, "reviews per batch", "> 0"),
    "share_prefix": (True, "compute the start every prompt of a batch shares (the instruction) once a batch"),
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


def batches_of(prompts, config, desc):
    """Batches of prompt indices of similar length, with their prompts."""
    for batch in tqdm(by_length(range(len(prompts)), config.batch_size, lambda i: len(prompts[i])),
                      desc=desc, unit="batch", leave=False, file=sys.stderr):
        yield batch, [prompts[i] for i in batch]


def shared_start(model, prompts, config):
    """The tokens every prompt begins with (the demonstrations and the instruction), computed once for
    every batch of the evaluation to attend to (share_prefix=false: none)."""
    return model.start_cache(prompts[0][:common_start(prompts)] if config.share_prefix else [])


def generated_answers(model, prompts, config, ctx):
    """What the model writes after each prompt: up to max_new_tokens tokens, ending at <|endoftext|>."""
    enc, answers = get_tokenizer(), [None] * len(prompts)
    with ctx:
        start = shared_start(model, prompts, config)
    for batch, rows in batches_of(prompts, config, f"generate {len(prompts)} reviews"):
        with ctx:
            new = model.generate_batch(rows, config.max_new_tokens, config.temperature, config.top_k or None,
                                       (enc.eot_token,), start)
        for i, tokens in zip(batch, new):
            answers[i] = enc.decode([t for t in tokens if t != enc.eot_token])
    return answers


def label_logits(model, prompts, config, ctx):
    """For each prompt, the logit of ' positive' minus that of ' negative' as the next token."""
    enc, differences = get_tokenizer(), [None] * len(prompts)
    positive, negative = (enc.encode_ordinary(LABEL_WORDS[label])[0] for label in (1, 0))
    with ctx:
        start = shared_start(model, prompts, config)
    for batch, rows in batches_of(prompts, config, f"logprob {len(prompts)} reviews"):
        with ctx:
            logits = model.prefill(rows, start)[0].float()
        for i, difference in zip(batch, (logits[:, positive] - logits[:, negative]).tolist()):
            differences[i] = difference
    return differences


@torch.no_grad()
def predict_labels(model, records, method, config, ctx, prefix=""):
    """Each record with its continuation and prediction (1 positive, 0 negative, -1 unparseable), each
    prompt after prefix (the demonstrations): method generate reads the label off the generated answer;
    logprob takes the likelier label word (never -1)."""
    model.eval()  # merges LoRA into the weights
    generated = config.max_new_tokens if method == "generate" else 0
    check_prompt_room(config.prompt_template, model.context_length, generated)
    room = model.context_length - generated
    prompts = [encode_prompt(r["text"], config.prompt_template, room, prefix) for r in records]
    if method == "generate":
        return [dict(text=r["text"], label=r["label"], continuation=answer,
                     prediction=parse_label(answer, config.parse))
                for r, answer in zip(records, generated_answers(model, prompts, config, ctx))]
    return with_log_odds(records, label_logits(model, prompts, config, ctx))


def with_log_odds(records, log_odds):
    """Each record with its log-odds of ' positive' over ' negative', p_positive, and the likelier label."""
    return [dict(text=r["text"], label=r["label"], continuation=LABEL_WORDS[int(d > 0)],
                 prediction=int(d > 0), p_positive=0.5 * (1 + math.tanh(d / 2)), log_odds=d)  # sigmoid(d)
            for r, d in zip(records, log_odds)]


def content_free_p_positive(model, config, ctx, prefix=""):
    """The mean p(positive) the model gives content-free reviews in the same prompt (Zhao et al. 2021)."""
    records = [dict(text=text, label=None) for text in CONTENT_FREE]
    scored = predict_labels(model, records, "logprob", config, ctx, prefix)
    return sum(r["p_positive"] for r in scored) / len(scored)


def calibrated(predictions, p_content_free):
    """Contextual calibration: each review's label probabilities divided by the content-free ones
    (p_content_free, 1 - p_content_free) and renormalised, so that a content-free review is 50/50; in
    log-odds, the content-free log-odds subtracted."""
    p = min(max(p_content_free, 1e-12), 1 - 1e-12)  # a saturated one would shift by infinity
    shift = math.log(p / (1 - p))
    return with_log_odds(predictions, [r["log_odds"] - shift for r in predictions])


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


def evaluate(model, checkpoints, records, config, ctx, prefix=""):
    """The handout's line for each checkpoint (its trained tensors loaded into model) and method, each
    prompt after prefix (demonstrations). Returns (rows, predictions): the numbers, with the settings
    behind them, and every answer."""
    rows, predictions = [], []
    for name, checkpoint in checkpoints:
        if checkpoint is not None:
            load_trained(model, checkpoint)
        for method in ("generate", "logprob") if config.method == "both" else (config.method,):
            start = time.time()
            readings = [(predict_labels(model, records, method, config, ctx, prefix), None)]
            if method == "logprob" and config.calibrate:  # the same log-probabilities, shifted: a free row
                calibration = content_free_p_positive(model, config, ctx, prefix)
                readings.append((calibrated(readings[0][0], calibration), calibration))
            seconds, device = time.time() - start, device_name(str(next(model.parameters()).device))
            for preds, calibration in readings:
                reading = None if calibration is None else "calibrated"  # of the label probabilities
                parse = config.parse if method == "generate" else reading
                rows.append(dict(checkpoint=name, iter_num=checkpoint and checkpoint["iter_num"],
                                 method=method, parse=parse, seconds=round(seconds, 3), **summarize(preds),
                                 settings=dict(vars(config), method=method, device=device,
                                               calibration=calibration)))
                predictions.append(dict(checkpoint=name, method=method, parse=parse, records=preds))
                print(f"{report_line(name + row_tag(method, parse), rows[-1])}\n  {len(records)} reviews in "
                      f"{seconds:.1f} s ({len(records) / seconds:.1f} reviews/s)")
    return rows, predictions


def row_tag(method, parse):
    if method == "logprob":
        return " [logprob, calibrated]" if parse == "calibrated" else " [logprob]"
    return f" [{parse}]" if parse != "near_start" else ""


def is_the_runs_result(config, trained_with):
    """Whether an evaluation is the handout's measurement of a run (or raw model): the whole test split,
    greedy, the default answer length, no demonstrations or calibration, and a run's own data and prompt."""
    handout = (config.split, config.num_examples, config.temperature, config.max_new_tokens, config.shots,
               config.calibrate) == ("test", 0, 0.0, FLAGS["max_new_tokens"][0], 0, False)
    own = trained_with is None or (config.dataset, config.prompt_template) == (
        trained_with["dataset"], trained_with["prompt_template"])
    return handout and own


def write_results(out, run_id, split, complete, rows, predictions):
    """Write an evaluation into out (an OutDir) and return the file's path. results.json keeps a run's
    complete greedy test evaluations, one row per checkpoint, method and reading, each replaced only by
    a newer one of its own and dropped once its checkpoint has changed; every other evaluation goes to
    last_evaluation.json. Each file holds the rows and, in the same order, the answers behind them."""
    if run_id is None and any(os.path.exists(out.file(f)) for _, f in CHECKPOINTS.values()):
        complete = False  # a raw model's evaluation beside a run's checkpoints is not the run's result
    name = "results.json" if complete else "last_evaluation.json"
    old = read_results(out.file(name)) if complete else None
    if old and old["run_id"] == run_id:  # keep the rows this evaluation does not replace, of checkpoints as
        new = {row_key(r) for r in rows}  # they are now
        now = {name: load_checkpoint(out.file(f), mmap=True)["iter_num"] for name, f in CHECKPOINTS.values()
               if os.path.isfile(out.file(f))}
        kept = [i for i, r in enumerate(old["results"])
                if row_key(r) not in new and now.get(r["checkpoint"]) == r["iter_num"]]
        rows = [old["results"][i] for i in kept] + rows
        predictions = [old["predictions"][i] for i in kept] + predictions
    evaluation = dict(run_id=run_id, split=split, complete=complete, results=rows, predictions=predictions)
    out.write(name, lambda f: f.write((json.dumps(evaluation, indent=1) + "\n").encode()))
    return out.file(name)


ROW_KEYS = {"checkpoint", "iter_num", "method", "parse", "seconds", "accuracy", "positive", "negative",
            "correct", "unparseable", "total", "settings"}  # what evaluate writes in each row


def row_key(row):
    return row["checkpoint"], row["method"], row["parse"]


def read_results(path):
    """A results file of ours, or None where it is missing or not one (it is then replaced, never read)."""
    results = read_json(path)
    ok = isinstance(results, dict) and {"run_id", "split", "results", "predictions"} <= set(results)
    rows = results["results"] if ok else None
    ok = ok and isinstance(rows, list) and all(
        isinstance(r, dict) and ROW_KEYS <= set(r) and isinstance(r["settings"], dict)
        and isinstance(r["accuracy"], (int, float)) for r in rows)
    ok = ok and isinstance(results["predictions"], list) and len(results["predictions"]) == len(rows)
    return results if ok else None


def is_tested(out_dir):
    """Whether results.json holds the greedy test accuracy of both checkpoints of out_dir as they are now."""
    results = read_results(os.path.join(out_dir, "results.json")) or dict(results=[], run_id=None)
    for name, filename in CHECKPOINTS.values():
        if not os.path.isfile(os.path.join(out_dir, filename)):
            return False
        checkpoint = load_checkpoint(os.path.join(out_dir, filename), mmap=True)  # tensors mapped, not read
        if results["run_id"] != checkpoint["run_id"] or not any(
                row_key(r) == (name, "generate", "near_start") and r.get("iter_num") == checkpoint["iter_num"]
                for r in results["results"]):
            return False
    return True


def read_reviews(text, file):
    """The reviews given with text= (a list) and file= (one a line; '-' is standard input). A file is
    split at '\\n' only: U+0085 and the like stay inside a review."""
    texts = list(text)
    try:
        if file == "-":
            texts += sys.stdin.read().split("\n")
        elif file:
            with open(file, encoding="utf-8", newline="") as f:
                texts += f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"file={file!r}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    reviews = [t.strip() for t in texts if t.strip()]
    if (text or file) and not reviews:
        raise UsageError("text= and file= hold no review to classify")
    return reviews


def classify(model, checkpoints, records, config, ctx, prefix=""):
    """Print, for each review, the label read off the generated answer, p(positive) and the answer."""
    for name, checkpoint in checkpoints:
        if checkpoint is not None:
            load_trained(model, checkpoint)
        if len(checkpoints) > 1:
            print(name)
        answers = predict_labels(model, records, "generate", config, ctx, prefix)
        scores = predict_labels(model, records, "logprob", config, ctx, prefix)
        if config.calibrate:
            scores = calibrated(scores, content_free_p_positive(model, config, ctx, prefix))
        for answer, score in zip(answers, scores):
            label = {1: "positive", 0: "negative", -1: "unparseable"}[answer["prediction"]]
            print(f"{label:<11}  p(positive)={score['p_positive']:.3f}  "
                  f"answer={json.dumps(answer['continuation'])}  {answer['text']}")


def find_checkpoints(config, explicit, out):
    """([(name, checkpoint)], the run's config, its base): a run's checkpoints (its data and prompt become
    config's where not given), or one raw GPT-2 for zero-shot ([(name, None)], None, None)."""
    if config.init_from != "resume":
        if explicit & {"ckpt", "base"}:
            given = " and ".join(sorted(explicit & {"ckpt", "base"}))
            raise UsageError(f"{given} choose a run's checkpoints and their base; init_from="
                             f"{config.init_from!r} is a raw GPT-2 (zero-shot)")
        name = f"{config.shots}-shot" if config.shots else "Zero-shot"
        return [(f"{name} {config.init_from}", None)], None, None
    ckpt = config.ckpt or ("best" if config.text or config.file else "both")
    checkpoints = out.checkpoints(("best", "last") if ckpt == "both" else (ckpt,))
    latest = out.latest()  # where the run's data and base are now
    for key in {"dataset", "prompt_template"} - explicit:
        setattr(config, key, latest["config"][key])
    if config.base and latest["base"] is None:
        raise UsageError(f"base={config.base!r}: the run in {out.path} trains every weight; it needs no base")
    return checkpoints, latest["config"], config.base or (latest["base"] and latest["base"]["init_from"])


def few_shot(config, splits, records, checkpoint):
    """(prefix, demonstration ids): config.shots train reviews drawn with shot_seed as prompt text, checked
    to fit the model's context (the checkpoint's, or init_from's) beside every review before it loads."""
    if not config.shots:
        return "", []
    ids = draw_demonstrations(splits, config.shots, config.shot_seed)
    demonstrations = [splits["train"][i] for i in ids]
    if checkpoint is None:
        with loading_weights("init_from", config.init_from):
            from transformers import GPT2Config  # its config alone: the weights load after this check
            context = GPT2Config.from_pretrained(config.init_from).n_positions
    else:
        context = checkpoint["model_args"]["block_size"] - checkpoint["model_args"].get("prefix_length", 0)
    answer = config.max_new_tokens if config.method != "logprob" or config.text or config.file else 0
    check_demonstrations_fit(demonstrations, records, config.prompt_template, context, answer)
    return few_shot_prefix(demonstrations, config.prompt_template), ids


def main(argv):
    config, explicit = parse_flags("generate.py", FLAGS, argv, __doc__)
    with reported_errors("generate.py", config.debug, also=(DataError,)):
        if config.top_k and not config.temperature:
            raise UsageError(f"top_k={config.top_k} samples among the likeliest tokens: give a temperature > "
                             "0 too (temperature=0 is greedy)")
        if config.calibrate and config.method == "generate":
            raise UsageError("calibrate=true calibrates label probabilities: give method=logprob or both")
        device, dtype = device_and_dtype(config.device, config.dtype)
        torch.manual_seed(config.seed)
        texts = read_reviews(config.text, config.file)  # none unless text= or file= is given
        with OutDir(config.out_dir, "generate.py", lock=config.init_from == "resume" or not texts) as out:
            checkpoints, trained_with, base = find_checkpoints(config, explicit, out)
            splits = None
            if config.shots or not texts:  # the data, checked before the model loads
                check_source("dataset", config.dataset)
                splits = load_rotten_tomatoes(config.dataset)
            if splits and config.num_examples >= len(splits[config.split]):
                config.num_examples = 0  # as many as there are: the whole split
            records = ([dict(text=t, label=None) for t in texts] if texts
                       else sample(splits[config.split], config.num_examples))
            prefix, config.demonstrations = few_shot(config, splits, records, checkpoints[0][1])
            if config.show_prompt:
                print(prefix + get_sentiment_prompt(records[0]["text"], template=config.prompt_template))
            if trained_with is None:
                with loading_weights("init_from", config.init_from):
                    model = GPT.from_pretrained(config.init_from)
            else:
                model = load_model(checkpoints[0][1], base)
            model.to(device)
            ctx = autocast(device, dtype)
            if texts:
                return classify(model, checkpoints, records, config, ctx, prefix)
            rows, predictions = evaluate(model, checkpoints, records, config, ctx, prefix)
            run_id = checkpoints[0][1]["run_id"] if trained_with else None
            complete = is_the_runs_result(config, trained_with)
            path = write_results(out, run_id, config.split, complete, rows, predictions)
            print(f"wrote {path}")
            return rows


if __name__ == "__main__":
    main(sys.argv[1:])
