import contextlib
import io
import json
import os
import sys

import pytest
import torch

import generate
from harness.checkpoints import load_checkpoint, load_model
from conftest import greedy_one_at_a_time, run_train
from dataloader import common_start, encode_prompt, get_tokenizer, load_rotten_tomatoes
from generate import parse_label, predict_labels, summarize
from harness.flags import defaults

CPU = contextlib.nullcontext()  # float32 on the CPU: no autocast


def settings(**changes):
    return defaults(generate.FLAGS, **changes)
from model import GPT, GPTConfig, KVCache


@pytest.mark.parametrize("text, near_start, first_word", [
    (" positive", 1, 1), ("Positive!", 1, 1), (" negative.", 0, 0), ("\n negative", 0, 0),
    (" NEGATIVE<|endoftext|>", 0, 0),
    (' "positive"', 1, -1), (" (negative)", 0, -1), (" - positive", 1, -1), ("\n\npositive", 1, 1),
    (" neutral", -1, -1), ("", -1, -1), ("   ", -1, -1), (" positively", 1, -1), (" not positive", 1, -1),
    (" negative positive", 0, 0), (" positive, not negative", 1, 1), (" pos", -1, -1), ("positive,", 1, 1),
    (" 1", -1, -1),
    (" it is a film that feels negative", -1, -1),  # the label begins past the first 20 characters
    (" a film, feels negative", 0, -1),             # ... and here within them
])
def test_parse_label(text, near_start, first_word):
    assert parse_label(text) == parse_label(text, "near_start") == near_start
    assert parse_label(text, "first_word") == first_word


@pytest.fixture(scope="module")
def lora_model(hf_gpt2_dir):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=8, lora_alpha=16.0))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B, std=0.05)
    return model.eval()


@pytest.mark.parametrize("shared", [0, 19])
def test_batched_greedy_equals_one_at_a_time(lora_model, shared, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    start = torch.randint(0, 50257, (shared,), generator=generator).tolist()  # like the instruction
    lengths = ([1, 0] if shared else []) + torch.randint(3, 60, (48,), generator=generator).tolist()
    prompts = [start + torch.randint(0, 50257, (n,), generator=generator).tolist() for n in lengths]
    shared_starts = []
    monkeypatch.setattr(KVCache, "share",  # counts each start shared, by its length
                        lambda self, real=KVCache.share: (shared_starts.append(len(self)), real(self)))
    stop = (50256, 198)
    # one prompt is the start alone: one token of it is its own
    assert common_start(prompts) == (18 if shared else 0)
    start = lora_model.start_cache(prompts[0][:common_start(prompts)])
    batched = lora_model.generate_batch(prompts, 8, temperature=0.0, stop_tokens=stop, start=start)
    assert shared_starts == ([18] if shared else [])  # a common start is computed once
    for prompt, got in zip(prompts, batched):
        full = greedy_one_at_a_time(lora_model, prompt, 8)
        cut = next((i + 1 for i, t in enumerate(full) if t in stop), len(full))
        assert got == full[:cut]
    assert len({len(p) for p in prompts}) > 20
    logits = lora_model.prefill(prompts, start)[0]
    for prompt, row in zip(prompts, logits):
        with torch.no_grad():
            torch.testing.assert_close(row, lora_model(torch.tensor([prompt]))[0][0, -1], rtol=0, atol=1e-5)


def test_logprob_is_the_argmax_of_the_two_label_logits(lora_model, small_data_dir):
    records = load_rotten_tomatoes(str(small_data_dir))["test"]
    preds = predict_labels(lora_model, records, "logprob", settings(batch_size=16), CPU)
    prompts = [encode_prompt(r["text"]) for r in records]
    for prompt, pred in zip(prompts, preds):
        with torch.no_grad():
            logits, _ = lora_model(torch.tensor([prompt]))
        log_probs = torch.log_softmax(logits[0, -1], dim=-1)
        assert pred["prediction"] == int(log_probs[3967] > log_probs[4633])
        assert pred["continuation"] == (" positive" if pred["prediction"] else " negative")


def test_generate_method_parses_the_generated_text(lora_model, small_data_dir):
    records = load_rotten_tomatoes(str(small_data_dir))["test"][:20]
    preds = predict_labels(lora_model, records, "generate", settings(max_new_tokens=3, batch_size=7), CPU)
    enc = get_tokenizer()
    prompts = [encode_prompt(r["text"]) for r in records]
    for prompt, record, pred in zip(prompts, records, preds):
        tokens = greedy_one_at_a_time(lora_model, prompt, 3)
        cut = next((i + 1 for i, t in enumerate(tokens) if t == 50256), len(tokens))
        assert pred["continuation"] == enc.decode([t for t in tokens[:cut] if t != 50256])
        assert pred["prediction"] == parse_label(pred["continuation"])
        assert (pred["text"], pred["label"]) == (record["text"], record["label"])


def test_accuracy_counts_unparseable_as_wrong():
    preds = [dict(label=1, prediction=1), dict(label=0, prediction=1), dict(label=0, prediction=0),
             dict(label=1, prediction=-1), dict(label=0, prediction=-1)]
    assert summarize(preds) == dict(accuracy=0.4, positive=2, negative=1, correct=2, unparseable=2, total=5)
    assert generate.report_line("Best Val Checkpoint", summarize(preds)) == (
        "Best Val Checkpoint || Accuracy: 0.4000, Positive Predictions: 2, Negative Predictions: 1, "
        "Correct Predictions: 2, Unparseable: 2")


@pytest.fixture(scope="module")
def trained_run(hf_gpt2_dir, small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=2",
                  "rank=8", "lr=1e-2", "eval_test=true")
    return out, printed.getvalue()


def test_train_reports_both_checkpoints_through_generate(trained_run):
    trained_run, printed = trained_run
    lines = [l for l in printed.splitlines() if " || Accuracy: " in l]
    assert [l.split(" || ")[0] for l in lines] == ["Best Val Checkpoint", "Last Iter Checkpoint"]
    assert printed.endswith(f"results: {trained_run / 'results.json'}\n")
    results = json.loads((trained_run / "results.json").read_text())
    for row in results["results"]:
        assert generate.report_line(row["checkpoint"], row) in lines
    assert [r["checkpoint"] for r in results["results"]] == ["Best Val Checkpoint", "Last Iter Checkpoint"]
    assert all(r["total"] == 64 and r["method"] == "generate" for r in results["results"])


def test_generate_evaluates_both_checkpoints(trained_run, capsys):
    trained_run, _ = trained_run
    rows = generate.main([f"out_dir={trained_run}", "device=cpu", "method=both", "batch_size=10"])
    out = capsys.readouterr().out
    for name in ("Best Val Checkpoint", "Last Iter Checkpoint"):
        line = next(l for l in out.splitlines() if l.startswith(name + " || "))
        row = next(r for r in rows if r["checkpoint"] == name and r["method"] == "generate")
        assert line == generate.report_line(name, row)
        assert f"{name} [logprob] || Accuracy: " in out
    results = json.loads((trained_run / "results.json").read_text())
    predictions = results["predictions"]
    assert results["split"] == "test" and results["complete"] is True
    assert results["run_id"] == load_checkpoint(trained_run / "ckpt.pt")["run_id"]
    assert all(r["settings"]["prompt_template"] == "default" for r in results["results"])
    assert [(r["checkpoint"], r["method"]) for r in results["results"]] == [
        ("Best Val Checkpoint", "generate"), ("Best Val Checkpoint", "logprob"),
        ("Last Iter Checkpoint", "generate"), ("Last Iter Checkpoint", "logprob")]
    assert len(predictions) == 4
    for row, pred_set in zip(results["results"], predictions):
        assert (row["checkpoint"], row["method"]) == (pred_set["checkpoint"], pred_set["method"])
        assert len(pred_set["records"]) == row["total"] == 64
        assert summarize(pred_set["records"]) == {k: row[k] for k in summarize(pred_set["records"])}
        fields = ({"text", "label", "continuation", "prediction"}
                  | ({"p_positive", "log_odds"} if row["method"] == "logprob" else set()))
        assert all(set(r) == fields for r in pred_set["records"])


def test_zero_shot_on_a_local_directory(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    generate.main([f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={tmp_path}",
                   "num_examples=500", "split=validation", "device=cpu"])
    out = capsys.readouterr().out
    assert "  64 reviews in " in out  # num_examples past the split's size: all of it
    assert f"Zero-shot {hf_gpt2_dir} || Accuracy: " in out
    assert sorted(os.listdir(tmp_path)) == [".lock", "last_evaluation.json"]
    results = json.loads((tmp_path / "last_evaluation.json").read_text())  # not a test result
    assert (results["split"] == "validation" and results["results"][0]["total"] == 64
            and results["complete"] is False)
    generate.main([f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={tmp_path}",
                   "num_examples=500", "device=cpu"])  # the whole test split: the model's test result
    row = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert row["total"] == 64 and row["settings"]["num_examples"] == 0


def test_missing_and_corrupt_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main([f"out_dir={tmp_path}", "device=cpu"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"generate.py: error: no checkpoint at {tmp_path / 'ckpt.pt'}; make one with: "
        f"python train.py out_dir={tmp_path}")
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(SystemExit) as e:
        generate.main([f"out_dir={tmp_path}", "ckpt=best", "device=cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith(f"generate.py: error: {tmp_path / 'ckpt.pt'} is corrupt or truncated (")
    # the lock comes first, before anything is read
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt"]


def test_checkpoint_template_is_the_default_and_sampling_is_seeded(hf_gpt2_dir, small_data_dir, tmp_path,
                                                                   capsys):
    out = tmp_path / "question"
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=1",
              "rank=8", "prompt_template=question")
    generate.main([f"out_dir={out}", "ckpt=last", "device=cpu"])
    assert (json.loads((out / "results.json").read_text())["results"][0]["settings"]["prompt_template"]
            == "question")
    sampled = []
    for _ in range(2):
        generate.main([f"out_dir={out}", "ckpt=last", "device=cpu", "temperature=1.5", "top_k=50", "seed=7"])
        sampled.append([r["continuation"] for r in json.loads(
            (out / "last_evaluation.json").read_text())["predictions"][0]["records"]])
    assert sampled[0] == sampled[1]
    generate.main([f"out_dir={out}", "ckpt=last", "device=cpu"])
    greedy = [r["continuation"]
              for r in json.loads((out / "results.json").read_text())["predictions"][0]["records"]]
    assert greedy != sampled[0]


def test_classify_your_own_reviews(trained_run, tmp_path, monkeypatch, capsys):
    out, _ = trained_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    reviews = ["an utterly charming film", "a dull , lifeless mess", "not bad at all"]
    (tmp_path / "reviews.txt").write_text(f"{reviews[1]}\n\n")
    capsys.readouterr()
    generate.main([f"out_dir={out}", f"text={reviews[0]}", f"file={tmp_path / 'reviews.txt'}", "device=cpu"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{reviews[2]}\n"))
    generate.main([f"out_dir={out}", "file=-", "device=cpu"])
    lines = capsys.readouterr().out.splitlines()
    model = load_model(load_checkpoint(out / "ckpt.pt")).eval()  # the best checkpoint, unless ckpt= says
    assert len(lines) == 3
    for review, line in zip(reviews, lines):
        prompt = encode_prompt(review)
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0][0, -1]
        p_positive = torch.sigmoid(logits[3967] - logits[4633]).item()
        answer = predict_labels(model, [dict(text=review, label=None)], "generate",
                                settings(), CPU)[0]["continuation"]
        label = {1: "positive", 0: "negative", -1: "unparseable"}[parse_label(answer)]
        assert line == (f"{label:<11}  p(positive)={p_positive:.3f}  "
                        f"answer={json.dumps(answer)}  {review}")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written


def test_classify_nothing_is_a_usage_error(trained_run, tmp_path, capsys):
    out, _ = trained_run
    (tmp_path / "empty.txt").write_text("\n  \n")
    for flag, message in ((f"file={tmp_path / 'empty.txt'}", "text= and file= hold no review to classify"),
                          (f"file={tmp_path / 'missing.txt'}",
                           f"file='{tmp_path / 'missing.txt'}': cannot read it "
                           "(No such file or directory)")):
        with pytest.raises(SystemExit) as e:
            generate.main([f"out_dir={out}", flag, "device=cpu"])
        assert e.value.code == 2 and capsys.readouterr().err == f"generate.py: error: {message}\n"


class Scripted:
    """A model that answers every prompt with the same tokens, stopping as generate_batch does."""
    config, context_length = GPTConfig(block_size=256), 256

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def eval(self):
        return self

    def start_cache(self, start):
        return None

    def generate_batch(self, prompts, max_new_tokens, temperature, top_k, stop_tokens, start):
        self.asked.append((max_new_tokens, stop_tokens))
        answer = self.answer[:max_new_tokens]
        cut = next((i + 1 for i, t in enumerate(answer) if t in stop_tokens), len(answer))
        return [answer[:cut] for _ in prompts]


@pytest.mark.parametrize("answer, continuation, near_start, first_word", [
    ([198, 198, 3967], "\n\n positive", 1, 1),      # newlines do not end the answer
    ([357, 31591, 8], " (negative)", 0, -1),
    ([366, 24561, 1], ' "positive"', 1, -1),
    ([3967, 50256, 4633], " positive", 1, 1),        # <|endoftext|> does
    ([198, 8500, 1000, 1001, 1002, 4633], "\n neutralale Se If", -1, -1),  # max_new_tokens=5 ends it first
])
def test_answers_are_read_up_to_max_new_tokens_or_the_end_of_text(answer, continuation, near_start,
                                                                   first_word):
    records = [dict(text="a film", label=1), dict(text="another film , longer", label=0)]
    model = Scripted(answer)
    for rule, expected in (("near_start", near_start), ("first_word", first_word)):
        predicted = predict_labels(model, records, "generate", settings(max_new_tokens=5, parse=rule), CPU)
        assert [(p["continuation"], p["prediction"]) for p in predicted] == [(continuation, expected)] * 2
    assert model.asked[0] == (5, (50256,))


def test_num_examples_is_the_same_random_sample_of_both_labels(hf_gpt2_dir, data_dir, tmp_path):
    picked = []
    for _ in range(2):
        generate.main([f"init_from={hf_gpt2_dir}", f"dataset={data_dir}", f"out_dir={tmp_path}",
                       "num_examples=40", "device=cpu", "method=logprob"])
        picked.append([r["text"] for r in json.loads(
            (tmp_path / "last_evaluation.json").read_text())["predictions"][0]["records"]])
    test = load_rotten_tomatoes(str(data_dir))["test"]
    assert picked[0] == picked[1] and len(set(picked[0])) == 40
    labels = {r["text"]: r["label"] for r in test}
    assert 10 < sum(labels[t] for t in picked[0]) < 30  # the split's first 533 reviews are all positive
    order = {r["text"]: i for i, r in enumerate(test)}
    assert [order[t] for t in picked[0]] == sorted(order[t] for t in picked[0])  # in the split's order


def test_own_reviews_are_split_at_newlines_only(trained_run, tmp_path, capsys):
    out, _ = trained_run
    reviews = ["a film\u0085with a next-line inside", "one\x0cform feed", "and\u2028a line separator"]
    (tmp_path / "reviews.txt").write_bytes(("\r\n".join(reviews) + "\n\n").encode())
    capsys.readouterr()
    generate.main([f"out_dir={out}", f"file={tmp_path / 'reviews.txt'}", "device=cpu"])
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert len(lines) == 3 and all(line.endswith(review) for line, review in zip(lines, reviews)), lines
