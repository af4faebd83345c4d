"""Test accuracy of a fine-tuned checkpoint, or zero-shot accuracy of a raw GPT-2.

    python generate.py out_dir=runs/r16_a64            # Best Val and Last Iter checkpoints
    python generate.py init_from=gpt2-medium           # zero-shot
    python generate.py method=both                     # also the log-probability method
    python generate.py out_dir=runs/r16_a64 text="an utterly charming film"   # classify your own reviews

method=generate follows the handout: generate a few tokens after the prompt and read the label
off their first characters (anything else counts as wrong). method=logprob compares the
probabilities of " positive" and " negative" after the prompt, so it always answers.
"""
import contextlib
import json
import os
import sys
import time

import torch

from checkpoint import CheckpointError, atomic_write, load_checkpoint, load_model, same_run
from configurator import (UsageError, autocast, check_source, device_name, fail, parse_flags, resolve_device,
                          resolve_dtype, source_error)
from dataloader import (LABEL_WORDS, PROMPT_TEMPLATES, DataError, check_prompt_room, encode_prompts, get_tokenizer,
                        load_rotten_tomatoes, sample)
from model import GPT
from outdir import locked

FLAGS = {
    "init_from": ("resume", "'resume': the checkpoints in out_dir; or gpt2, gpt2-medium, ..., a hub id or a local Hugging Face GPT-2 directory (zero-shot)"),
    "out_dir": ("out", "where the checkpoints are; results.json and predictions.json go here"),
    "ckpt": ("both", "init_from=resume: best (ckpt.pt), last (ckpt_last.pt) or both (with text or file: best)"),
    "base": ("", "a LoRA run's base model where it is no longer at the run's init_from (a name or directory)"),
    "text": ([], "classify this review instead of a split (repeat the flag for more)"),
    "file": ("", "classify each line of this file instead of a split ('-' = standard input)"),
    "dataset": ("", "hub name or local directory with train/validation/test.jsonl; default: the checkpoint's, else rotten_tomatoes"),
    "split": ("test", "test or validation"),
    "num_examples": (0, "evaluate N reviews of the split drawn at random (the same N every time); 0 = all"),
    "prompt_template": ("", f"one of {', '.join(PROMPT_TEMPLATES)}; default: the checkpoint's, else default"),
    "method": ("generate", "generate (parse generated text), logprob (compare label probabilities) or both"),
    "max_new_tokens": (5, "tokens generated per review (fewer where the answer ends)"),
    "parse": ("near_start", "how an answer is read: near_start (the first of positive/negative within its first "
                            "20 characters, as the handout reads it) or first_word (its first word must be one)"),
    "temperature": (0.0, "0 = greedy (the default: accuracy must not depend on luck)"),
    "top_k": (0, "with temperature > 0, sample from the k most likely tokens; 0 = all"),
    "seed": (1337, "random seed for sampling"),
    "batch_size": (64, "reviews per batch"),
    "device": ("auto", "auto, cpu, cuda, cuda:N or mps"),
    "dtype": ("auto", "auto, float32, bfloat16 or float16"),
    "debug": (False, "show full tracebacks"),
}
CHECKPOINTS = {"best": ("Best Val Checkpoint", "ckpt.pt"), "last": ("Last Iter Checkpoint", "ckpt_last.pt")}
METHODS = ("generate", "logprob")
LABEL_NAMES = {1: "positive", 0: "negative", -1: "unparseable"}
GENERATION = ("prompt_template", "max_new_tokens", "temperature", "top_k", "parse", "batch_size")  # predict_labels'
PARSE_RULES = ("near_start", "first_word")
NEAR_START = 20  # characters: the handout looks for the label in the first few characters of the answer


def parse_label(continuation, rule="near_start"):
    """1 for positive, 0 for negative, -1 for anything else: the one place an answer is read.

    near_start (the handout's reading): whichever of "positive" and "negative", in any case, begins
    first within the answer's first 20 characters. So ' "positive"', " (negative)", " - positive"
    and "\n\npositive" are answers, and so is " not positive" (1); " neutral" and "" are not.
    first_word: skip white space, take the first word (a run of letters); it must be exactly one of
    the two. So " Positive!" is 1, while " positively", " not positive" and ' "positive"' are -1.
    """
    if rule == "first_word":
        text = continuation.lstrip()
        end = 0
        while end < len(text) and text[end].isalpha():
            end += 1
        return {"positive": 1, "negative": 0}.get(text[:end].lower(), -1)
    text = continuation.lower()
    found = [(text.find(word), label) for word, label in (("positive", 1), ("negative", 0)) if word in text]
    start, label = min(found, default=(NEAR_START, -1))
    return label if start < NEAR_START else -1


def _length_sorted_batches(prompts, batch_size):
    """Indices in batches of similar prompt length, so little padding is computed."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _progress(batches, desc):
    from tqdm.auto import tqdm
    return tqdm(batches, desc=desc, unit="batch", leave=False, file=sys.stderr)


@torch.no_grad()
def predict_labels(model, records, method="generate", *, prompt_template="default", max_new_tokens=5,
                   temperature=0.0, top_k=0, parse="near_start", batch_size=64, device="cpu", dtype="float32",
                   share_prefix=True):
    """One record per review: text, label, continuation and prediction (1, 0 or -1). method=generate
    reads the label off up to max_new_tokens generated tokens (fewer where <|endoftext|> ends them);
    method=logprob compares " positive" with " negative" after the prompt and adds p_positive."""
    model.eval()  # merges LoRA into the weights
    enc = get_tokenizer()
    generated = max_new_tokens if method == "generate" else 0
    check_prompt_room(prompt_template, model.config.block_size, generated)
    prompts, _ = encode_prompts([r["text"] for r in records], prompt_template, model.config.block_size - generated)
    label_ids = {label: enc.encode_ordinary(word)[0] for label, word in LABEL_WORDS.items()}
    continuations, predictions, p_positive = [None] * len(records), [None] * len(records), [None] * len(records)
    for batch in _progress(_length_sorted_batches(prompts, batch_size), f"{method} {len(records)} reviews"):
        with autocast(device, dtype):
            if method == "generate":
                new = model.generate_batch([prompts[i] for i in batch], max_new_tokens, temperature, top_k or None,
                                           stop_tokens=(enc.eot_token,), share_prefix=share_prefix)
                for i, tokens in zip(batch, new):
                    continuations[i] = enc.decode([t for t in tokens if t != enc.eot_token])
                    predictions[i] = parse_label(continuations[i], parse)
            else:
                logits = model.last_logits_batch([prompts[i] for i in batch], share_prefix=share_prefix).float()
                positive, negative = logits[:, label_ids[1]], logits[:, label_ids[0]]
                for i, is_positive, p in zip(batch, (positive > negative).tolist(),
                                             torch.sigmoid(positive - negative).tolist()):
                    predictions[i], p_positive[i] = int(is_positive), p
                    continuations[i] = LABEL_WORDS[predictions[i]]
    return [dict(text=r["text"], label=r["label"], continuation=c, prediction=p, **({} if q is None else dict(p_positive=q)))
            for r, c, p, q in zip(records, continuations, predictions, p_positive)]


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


def evaluate(model, name, records, methods, settings, *, device, dtype):
    """Print the handout's line per method; return (results rows, prediction sets)."""
    rows, sets = [], []
    for method in methods:
        start = time.time()
        preds = predict_labels(model, records, method, device=device, dtype=dtype, **{k: settings[k] for k in GENERATION})
        seconds = time.time() - start
        summary = summarize(preds)
        parse = settings["parse"] if method == "generate" else None
        tag = f" [{method}]" if method == "logprob" else (f" [{parse}]" if parse != "near_start" else "")
        print(report_line(name + tag, summary))
        print(f"  {len(records)} reviews in {seconds:.1f} s ({len(records) / seconds:.1f} reviews/s)")
        rows.append(dict(checkpoint=name, method=method, parse=parse, settings=settings, seconds=round(seconds, 3),
                         **summary))
        sets.append(dict(checkpoint=name, method=method, parse=parse, records=preds))
    return rows, sets


def classify(model, texts, settings, *, device, dtype):
    """Print, for each review, the label read off the generated answer, p(positive) and the answer."""
    records = [dict(text=t, label=None) for t in texts]
    answers, scores = (predict_labels(model, records, method, device=device, dtype=dtype,
                                      **{k: settings[k] for k in GENERATION}) for method in METHODS)
    for answer, score in zip(answers, scores):
        print(f"{LABEL_NAMES[answer['prediction']]:<11}  p(positive)={score['p_positive']:.3f}  "
              f"answer={json.dumps(answer['continuation'])}  {answer['text']}")
    return [dict(a, p_positive=s["p_positive"]) for a, s in zip(answers, scores)]


def read_reviews(config):
    """The reviews given with text= and file= (one per line, '-' = standard input)."""
    texts = list(config.text)
    if config.file == "-":
        texts += sys.stdin.read().splitlines()
    elif config.file:
        try:
            with open(config.file, encoding="utf-8") as f:
                texts += f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"file={config.file!r}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise UsageError("text= and file= hold no review to classify")
    return texts


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_results(out_dir, run_id, split, rows, sets, complete):
    """results.json and predictions.json keep a run's complete greedy test evaluations, one row per
    checkpoint and method, each replaced only by a newer one of its own. Anything else (a subset,
    another split, sampling, a raw model beside a run's checkpoints) goes to last_evaluation.json
    and last_predictions.json instead. Returns the results file's path."""
    beside_a_run = run_id is None and any(os.path.exists(os.path.join(out_dir, f)) for f in ("ckpt.pt", "ckpt_last.pt"))
    if complete and not beside_a_run:
        results_path, predictions_path = (os.path.join(out_dir, f) for f in ("results.json", "predictions.json"))
        old = read_json(results_path)
        if old and old.get("run_id") == run_id:  # keep the rows this evaluation does not replace

            def key(row):
                return row["checkpoint"], row["method"], row["parse"]
            new = {key(r) for r in rows}
            rows = [r for r in old["results"] if key(r) not in new] + rows
            sets = [s for s in read_json(predictions_path) or [] if key(s) not in new] + sets
    else:
        results_path, predictions_path = (os.path.join(out_dir, f) for f in ("last_evaluation.json", "last_predictions.json"))

    def dump(obj):
        return lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode())
    atomic_write(predictions_path, dump(sets))
    atomic_write(results_path, dump(dict(run_id=run_id, split=split, complete=complete, results=rows)))
    return results_path


def _select(records, num_examples, split):
    if num_examples > len(records):
        print(f"num_examples={num_examples} is more than the {len(records)} {split} examples; using all of them")
    return sample(records, num_examples)


def main(argv):
    config, explicit = parse_flags("generate.py", FLAGS, argv, __doc__)
    try:
        return run(config, explicit)
    except (UsageError, DataError, CheckpointError) as e:
        if config.debug:
            raise
        fail("generate.py", str(e))


def _check(config):
    if config.split not in ("test", "validation"):
        raise UsageError(f"split={config.split!r}: expected test or validation")
    if config.method not in METHODS + ("both",):
        raise UsageError(f"method={config.method!r}: expected generate, logprob or both")
    if config.ckpt not in ("best", "last", "both"):
        raise UsageError(f"ckpt={config.ckpt!r}: expected best, last or both")
    if config.parse not in PARSE_RULES:
        raise UsageError(f"parse={config.parse!r}: expected {' or '.join(PARSE_RULES)}")
    if config.prompt_template and config.prompt_template not in PROMPT_TEMPLATES:
        raise UsageError(f"prompt_template={config.prompt_template!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")
    for key in ("max_new_tokens", "batch_size"):
        if getattr(config, key) <= 0:
            raise UsageError(f"{key}={getattr(config, key)}: must be positive")
    for key in ("num_examples", "top_k", "temperature"):
        if getattr(config, key) < 0:
            raise UsageError(f"{key}={getattr(config, key)}: must be >= 0")
    if not 0 <= config.seed < 2**32:
        raise UsageError(f"seed={config.seed}: must be in [0, 2**32)")
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise UsageError(f"out_dir={config.out_dir!r} is a file, not a directory")


def run(config, explicit=()):
    _check(config)
    own_reviews = bool(config.text or config.file)
    if own_reviews and "ckpt" not in explicit:
        config.ckpt = "best"
    texts = read_reviews(config) if own_reviews else None
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    models, run_id, trained_with = to_evaluate(config)
    settings = {k: getattr(config, k) for k in ("max_new_tokens", "temperature", "top_k", "parse", "batch_size", "seed")}
    settings["init_from"] = config.init_from
    settings["device"] = device_name(device)
    settings["dataset"] = config.dataset or trained_with.get("dataset", "rotten_tomatoes")
    settings["prompt_template"] = config.prompt_template or trained_with.get("prompt_template", "default")
    for _, _, source in models:  # a missing directory, or an unreachable hub, is found out now
        if source:
            check_source(*source)
    get_tokenizer()
    if own_reviews:
        for name, build, source in models:
            if len(models) > 1:
                print(name)
            classify(load(build, device, source), texts, settings, device=device, dtype=dtype)
        return None
    check_source("dataset", settings["dataset"])
    records = _select(load_rotten_tomatoes(settings["dataset"])[config.split], config.num_examples, config.split)
    methods = METHODS if config.method == "both" else (config.method,)
    complete = config.split == "test" and config.num_examples == 0 and config.temperature == 0
    rows, sets = [], []
    with contextlib.ExitStack() as hold:  # no other process writes in out_dir meanwhile
        if os.path.isdir(config.out_dir):
            hold.enter_context(locked(config.out_dir, "generate.py"))
        for name, build, source in models:
            model = load(build, device, source)
            if not os.path.isdir(config.out_dir):  # a new directory is made once the model has loaded
                os.makedirs(config.out_dir)
                hold.enter_context(locked(config.out_dir, "generate.py"))
            r, s = evaluate(model, name, records, methods, settings, device=device, dtype=dtype)
            rows += r
            sets += s
            del model
        path = write_results(config.out_dir, run_id, config.split, rows, sets, complete)
    print(f"wrote {path} and its predictions")
    return rows


def to_evaluate(config):
    """([(name, model builder, (flag, weights) it loads or None)], run id, the run's config): the
    checkpoints in out_dir, or a raw GPT-2."""
    if config.init_from != "resume":
        return [("Zero-shot " + config.init_from, lambda: GPT.from_pretrained(config.init_from),
                 ("init_from", config.init_from))], None, {}
    which = ("best", "last") if config.ckpt == "both" else (config.ckpt,)
    models, checkpoints = [], {}
    for key in which:
        name, filename = CHECKPOINTS[key]
        path = os.path.join(config.out_dir, filename)
        if not os.path.isfile(path):
            raise UsageError(f"no checkpoint at {path}; make one with: python train.py out_dir={config.out_dir}")
        checkpoints[path] = checkpoint = load_checkpoint(path)
        base = checkpoint["base"] and ("base", config.base or checkpoint["base"]["init_from"])
        models.append((name, lambda c=checkpoint: load_model(c, config.base or None), base))
    same_run(checkpoints)
    return models, checkpoint["run_id"], checkpoint["config"]


def load(build, device, source):
    try:
        return build().to(device)
    except CheckpointError:
        raise
    except ValueError as e:
        raise source_error(*source, e) from None


if __name__ == "__main__":
    main(sys.argv[1:])
