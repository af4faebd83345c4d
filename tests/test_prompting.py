"""Few-shot prompting and contextual calibration: the prompt, the demonstrations drawn, the shared
computation, the calibration arithmetic, and what an evaluation records."""
import contextlib
import json
import math

import pytest
import torch

import generate
from conftest import tiny_run_flags, run_train
from dataloader import (CONTENT_FREE, common_start, draw_demonstrations, encode_prompt, few_shot_prefix,
                        get_sentiment_prompt, get_tokenizer, load_rotten_tomatoes)
from generate import calibrated, content_free_p_positive, label_logits, predict_labels, with_log_odds
from harness.flags import defaults
from model import GPT, KVCache
from test_run_safety import fails_with

CPU = contextlib.nullcontext()
TOY = {"train": [dict(text="a dull film", label=0), dict(text="a warm film", label=1),
                 dict(text="a cold film", label=0), dict(text="a bright film", label=1)],
       "validation": [dict(text="an odd film", label=0)], "test": [dict(text="a fine film", label=1)]}


def test_the_few_shot_prompt_for_a_fixed_seed_is_exactly_this():
    ids = draw_demonstrations(TOY, 2, seed=0)
    prompt = few_shot_prefix([TOY["train"][i] for i in ids]) + get_sentiment_prompt("a fine film")
    assert ids == [3, 0]
    assert prompt == (
        "Instruction: Classify the sentiment of the movie review as positive or negative.\n"
        "Text: a bright film\nLabel: positive\n\n"
        "Instruction: Classify the sentiment of the movie review as positive or negative.\n"
        "Text: a dull film\nLabel: negative\n\n"
        "Instruction: Classify the sentiment of the movie review as positive or negative.\n"
        "Text: a fine film\nLabel:")
    assert few_shot_prefix([]) == ""


def test_the_same_seed_draws_the_same_demonstrations_and_another_seed_others(small_data_dir):
    splits = load_rotten_tomatoes(str(small_data_dir))
    draws = [draw_demonstrations(splits, 8, seed) for seed in range(5)]
    assert draws[0] == draw_demonstrations(splits, 8, 0)
    assert len({tuple(sorted(d)) for d in draws}) == 5 and len({tuple(d) for d in draws}) == 5


def test_no_validation_or_test_review_is_ever_a_demonstration():
    doubles = [dict(text=" an odd film", label=0), dict(text="a fine film", label=1)]  # in validation, test
    splits = dict(TOY, train=TOY["train"] + doubles)
    for seed in range(50):
        ids = draw_demonstrations(splits, 4, seed)
        assert sorted(ids) == [0, 1, 2, 3]  # the two train rows whose texts are also in other splits never


@pytest.mark.parametrize("shots", range(1, 9))
def test_demonstrations_are_balanced_between_the_labels(small_data_dir, shots):
    splits = load_rotten_tomatoes(str(small_data_dir))
    extra_labels = set()
    for seed in range(8):
        ids = draw_demonstrations(splits, shots, seed)
        assert len(set(ids)) == shots and all(0 <= i < len(splits["train"]) for i in ids)
        positives = sum(splits["train"][i]["label"] for i in ids)
        assert positives in ({shots // 2} if shots % 2 == 0 else {shots // 2, shots // 2 + 1})
        extra_labels.add(positives - shots // 2)
    assert extra_labels == ({0} if shots % 2 == 0 else {0, 1})  # an odd shot's extra label is drawn too


def test_more_shots_than_a_label_has_are_one_line():
    with pytest.raises(Exception) as e:
        draw_demonstrations(TOY, 6, 0)
    assert str(e.value) == "shots=6: the train split has 2 reviews labelled 0 to draw 3 from"


@pytest.fixture(scope="module")
def model(hf_gpt2_dir):
    torch.manual_seed(0)
    return GPT.from_pretrained(str(hf_gpt2_dir)).eval()


def test_sharing_the_demonstrations_gives_the_label_probabilities_of_whole_prompts(model, small_data_dir,
                                                                                  monkeypatch):
    splits = load_rotten_tomatoes(str(small_data_dir))
    prefix = few_shot_prefix([splits["train"][i] for i in draw_demonstrations(splits, 2, 3)])
    records = splits["test"][::4]
    prompts = [encode_prompt(r["text"], prefix=prefix) for r in records]
    assert common_start(prompts) >= len(get_tokenizer().encode_ordinary(prefix))
    starts = []
    monkeypatch.setattr(KVCache, "share",
                        lambda self, real=KVCache.share: (starts.append(len(self)), real(self)))
    shared = label_logits(model, prompts, defaults(generate.FLAGS, batch_size=8), CPU)
    assert starts == [common_start(prompts)]  # once for the evaluation's two batches
    whole = label_logits(model, prompts, defaults(generate.FLAGS, batch_size=8, share_prefix=False), CPU)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(whole), rtol=0, atol=1e-5)
    config = defaults(generate.FLAGS, batch_size=8)
    assert predict_labels(model, records, "logprob", config, CPU, prefix) == with_log_odds(records, shared)


def test_calibration_is_the_papers_arithmetic():
    records = [dict(text=t, label=1) for t in "abc"]
    p, c = [0.55, 0.2689414213699951, 0.8807970779778823], 0.8  # p(positive) of three reviews; content-free
    predictions = calibrated(with_log_odds(records, [math.log(q / (1 - q)) for q in p]), c)
    # divide each label's probability by the content-free one, and renormalise
    expected = [(q / c) / (q / c + (1 - q) / (1 - c)) for q in p]
    assert [r["p_positive"] for r in predictions] == pytest.approx(expected, abs=1e-12)
    assert [r["prediction"] for r in predictions] == [0, 0, 1]
    assert [r["continuation"] for r in predictions] == [" negative", " negative", " positive"]
    assert calibrated(predictions, 0.5) == predictions  # a 50/50 content-free input changes nothing


def test_the_content_free_probability_is_the_mean_over_its_three_inputs_in_the_same_prompt(model):
    prefix = few_shot_prefix(TOY["train"][:2])
    whole = [encode_prompt(text, prefix=prefix) for text in CONTENT_FREE]
    assert get_tokenizer().decode(whole[2]).endswith(
        "Label: positive\n\nInstruction: Classify the sentiment of the movie review as positive or "
        "negative.\nText: \nLabel:")
    logits = label_logits(model, whole, defaults(generate.FLAGS, share_prefix=False), CPU)
    expected = sum(1 / (1 + math.exp(-d)) for d in logits) / 3
    found = content_free_p_positive(model, defaults(generate.FLAGS), CPU, prefix)
    assert found == pytest.approx(expected, abs=1e-6)


def test_too_many_shots_for_the_context_stop_in_one_line_before_the_model_loads(
        hf_gpt2_dir, small_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(GPT, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    splits = load_rotten_tomatoes(str(small_data_dir))
    demonstrations = [splits["train"][i] for i in draw_demonstrations(splits, 8, 0)]
    taken = len(get_tokenizer().encode_ordinary(few_shot_prefix(demonstrations)))
    longest = max(len(encode_prompt(r["text"])) for r in splits["test"])
    fails_with(capsys, 2, f"generate.py: error: shots=8: the demonstrations take {taken} tokens, the longest "
               f"review's prompt {longest} and its answer 5: more than the 256-token context; give fewer "
               "shots", generate.main, [f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", "shots=8",
                                        f"out_dir={tmp_path / 'o'}", "device=cpu"])
    assert not (tmp_path / "o").exists()


def test_calibrating_generated_answers_is_refused(hf_gpt2_dir, tmp_path, capsys):
    fails_with(capsys, 2, "generate.py: error: calibrate=true calibrates label probabilities: give "
               "method=logprob or both", generate.main, [f"init_from={hf_gpt2_dir}", "calibrate=true",
                                                           f"out_dir={tmp_path}", "device=cpu"])


def test_a_few_shot_evaluation_records_its_settings_and_is_never_the_runs_result(
        hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1], "eval_test=true")
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    generate.main([f"out_dir={out}", "device=cpu", "shots=2", "shot_seed=7", "method=both", "calibrate=true",
                   "num_examples=16", "show_prompt=true"])
    printed = capsys.readouterr().out
    splits = load_rotten_tomatoes(str(small_data_dir))
    ids = draw_demonstrations(splits, 2, 7)
    assert printed.startswith(few_shot_prefix([splits["train"][i] for i in ids]) + "Instruction: ")
    assert "[logprob, calibrated] || Accuracy: " in printed
    assert (out / "results.json").read_bytes() == before
    rows = json.loads((out / "last_evaluation.json").read_text())["results"]
    # each checkpoint: its generated answers, then the logprob row and the calibrated one beside it
    assert [(r["method"], r["parse"], r["settings"]["shots"], r["settings"]["shot_seed"],
             r["settings"]["demonstrations"]) for r in rows] == [
        ("generate", "near_start", 2, 7, ids), ("logprob", None, 2, 7, ids),
        ("logprob", "calibrated", 2, 7, ids)] * 2
    assert [r["settings"]["calibrate"] for r in rows] == [True] * 6
    assert [r["settings"]["calibration"] is None for r in rows] == [True, True, False] * 2
    answers = json.loads((out / "last_evaluation.json").read_text())["predictions"]
    for i in (1, 4):  # the calibrated log-odds: the same ones, less the content-free log-odds
        p = rows[i + 1]["settings"]["calibration"]
        assert 0 < p < 1
        assert [a["log_odds"] for a in answers[i + 1]["records"]] == pytest.approx(
            [a["log_odds"] - math.log(p / (1 - p)) for a in answers[i]["records"]], abs=1e-9)
        assert f"[logprob] || Accuracy: {rows[i]['accuracy']:.4f}" in printed
        assert f"[logprob, calibrated] || Accuracy: {rows[i + 1]['accuracy']:.4f}" in printed
    assert not generate.is_the_runs_result(defaults(generate.FLAGS, shots=2), None)
    assert not generate.is_the_runs_result(defaults(generate.FLAGS, calibrate=True), None)
    assert generate.is_the_runs_result(defaults(generate.FLAGS), None)
