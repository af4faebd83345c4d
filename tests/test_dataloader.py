import json

import pytest
import torch

from dataloader import (PROMPT_TEMPLATES, CustomDataLoader, DataError, encode_prompt,
                        get_sentiment_prompt, get_tokenizer, load_rotten_tomatoes)
from dataloader import IGNORE_INDEX

POSITIVE, NEGATIVE, EOT = 3967, 4633, 50256


def write_split_dir(path, rows_by_split):
    path.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_rows(n=6):
    return [{"text": f"review number {i} was {'great' if i % 2 else 'dull'}", "label": i % 2}
            for i in range(n)]


@pytest.fixture
def tiny_dir(tmp_path):
    return write_split_dir(tmp_path / "tiny", {s: tiny_rows() for s in ("train", "validation", "test")})


@pytest.mark.parametrize("template", list(PROMPT_TEMPLATES))
def test_prompt_and_answer_tokens(template):
    enc = get_tokenizer()
    prompt = get_sentiment_prompt("a gorgeous , witty film", template=template)
    assert prompt.endswith(":") and "a gorgeous , witty film" in prompt
    for positive in (1, "positive", " Positive", "POSITIVE"):
        assert (get_sentiment_prompt("x", positive, template)
                == get_sentiment_prompt("x", template=template) + " positive")
    for negative in (0, "negative", "Negative "):
        assert (get_sentiment_prompt("x", negative, template)
                == get_sentiment_prompt("x", template=template) + " negative")
    assert (get_sentiment_prompt("x", "", template) == get_sentiment_prompt("x", None, template)
            == prompt.replace("a gorgeous , witty film", "x"))
    # the prompt's tokens are the start of the whole text's, and the answer is one token
    for label, answer in ((0, NEGATIVE), (1, POSITIVE)):
        ids = encode_prompt("a gorgeous , witty film", template)
        assert (enc.encode_ordinary(get_sentiment_prompt("a gorgeous , witty film", label, template))
                == ids + [answer])


@pytest.mark.parametrize("label", [2, -1, "neutral", "pos", True, 1.5, [1]])
def test_other_labels_are_refused(label):
    with pytest.raises(ValueError, match=r"^label must be 1, 0, 'positive', 'negative' or None, got "):
        get_sentiment_prompt("x", label)


def test_training_text_is_instr_tuned_text(tiny_dir, monkeypatch):
    import dataloader
    enc = get_tokenizer()
    # a student's own answer format (handout 5.11): the training text follows _add_instruction_finetuning
    monkeypatch.setattr(dataloader.CustomDataLoader, "_add_instruction_finetuning",
                        lambda self, rec: dict(rec, instr_tuned_text=get_sentiment_prompt(rec["text"]) +
                                               (" great" if rec["label"] else " awful")))
    loader = CustomDataLoader(str(tiny_dir), block_size=128)
    for rec, (ids, n_prompt) in zip(loader.records["train"], loader.examples["train"]):
        assert ids == enc.encode_ordinary(rec["instr_tuned_text"]) + [EOT]
        assert ids[n_prompt:] == enc.encode_ordinary(" great" if rec["label"] else " awful") + [EOT]
    monkeypatch.setattr(dataloader.CustomDataLoader, "_add_instruction_finetuning",
                        lambda self, rec: dict(rec, instr_tuned_text="Review: " + rec["text"] + " positive"))
    with pytest.raises(DataError, match="^instr_tuned_text must start with the prompt's tokens"):
        CustomDataLoader(str(tiny_dir), block_size=128)


def test_default_prompt_shape():
    assert get_sentiment_prompt("fun .") .startswith("Instruction: ")
    assert get_sentiment_prompt("fun .").endswith("\nText: fun .\nLabel:")


def test_loss_mask_covers_only_the_answer(tiny_dir):
    loader = CustomDataLoader(str(tiny_dir), block_size=128)
    examples = loader.examples["train"][:3]
    x, y, shared = loader.collate(examples)
    # the start every row shares, computed once by the model: the instruction
    # (and here the reviews' first words)
    assert get_tokenizer().decode(x[0, :shared].tolist()) == (
        "Instruction: Classify the sentiment of the movie review as positive or negative.\n"
        "Text: review number")
    for row, (ids, n_prompt) in enumerate(examples):
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1]
        assert torch.all(x[row, n:] == EOT)
        counted = (y[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert counted == [n_prompt - 1, n_prompt]
        assert y[row, counted].tolist() == [
            POSITIVE if loader.records["train"][row]["label"] else NEGATIVE, EOT]
    unmasked = CustomDataLoader(str(tiny_dir), block_size=128, mask_prompt=False)
    _, y_all, _ = unmasked.collate(examples)
    for row, (ids, _) in enumerate(examples):
        assert y_all[row, :len(ids) - 1].tolist() == ids[1:]
        assert torch.all(y_all[row, len(ids) - 1:] == IGNORE_INDEX)


def test_instruction_field():
    loader = CustomDataLoader.__new__(CustomDataLoader)
    loader.template = "default"
    rec = loader._add_instruction_finetuning({"text": "so bad", "label": 0})
    assert rec["instr_tuned_text"] == get_sentiment_prompt("so bad", 0)


def test_long_review_is_truncated_never_the_answer(tmp_path):
    rows = [{"text": "word " * 300, "label": 1}] + tiny_rows(3)
    d = write_split_dir(tmp_path / "long", {s: rows for s in ("train", "validation", "test")})
    loader = CustomDataLoader(str(d), block_size=64)
    assert loader.truncated == 3
    ids, n_prompt = loader.examples["train"][0]
    assert len(ids) - 1 <= 64 and ids[-2:] == [POSITIVE, EOT]
    assert get_tokenizer().decode(ids[:n_prompt]).endswith("\nLabel:")


def test_training_order_is_a_seeded_permutation_per_epoch(tiny_dir):
    loader = CustomDataLoader(str(tiny_dir), block_size=128, seed=3)
    first_epoch = loader.train_examples(0, 6)
    assert sorted(map(str, first_epoch)) == sorted(map(str, loader.examples["train"]))
    assert loader.train_examples(4, 4) == first_epoch[4:] + loader.train_examples(6, 2)
    again = CustomDataLoader(str(tiny_dir), block_size=128, seed=3)
    assert again.train_examples(0, 12) == loader.train_examples(0, 12)
    other = CustomDataLoader(str(tiny_dir), block_size=128, seed=4)
    assert other.train_examples(0, 12) != loader.train_examples(0, 12)


def test_real_splits(data_dir):
    splits = load_rotten_tomatoes(str(data_dir))
    assert {s: len(r) for s, r in splits.items()} == {"train": 8530, "validation": 1066, "test": 1066}
    for rows in splits.values():
        assert sum(r["label"] for r in rows) * 2 == len(rows)
    assert splits["train"][0]["text"].startswith(
        "the rock is destined to be the 21st century's new \" conan \"")
    assert splits["validation"][0]["text"].startswith(
        "compassionately explores the seemingly irreconcilable situation")
    assert splits["test"][0]["text"].startswith("lovingly photographed in the manner of a golden book")
    assert splits["train"][0]["label"] == splits["validation"][0]["label"] == splits["test"][0]["label"] == 1


def test_real_prompt_lengths(data_dir):
    loader = CustomDataLoader(str(data_dir), block_size=1024)
    assert loader.truncated == 0
    lengths = [len(ids) for ids, _ in loader.examples["train"]]  # prompt + answer, default template
    assert (min(lengths), max(lengths), sum(lengths)) == (25, 102, 417211)


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok", "label": 1}\n{"text": "ok", "label": 2}\n',
     "train split: {f}:2: 'label' must be 0 or 1, got 2"),
    ('{"text": "ok", "label": 1}\n{"label": 1}\n', "train split: {f}:2: 'text' is missing or empty"),
    ('{"text": "   ", "label": 1}\n', "train split: {f}:1: 'text' is missing or empty"),
    ('{"text": "ok", "label": 1}\n{"text": "ok", "label": 1\n', "train split: {f}:2: malformed JSON"),
    ('{"text": "ok", "label": true}\n', "train split: {f}:1: 'label' must be 0 or 1, got True"),
    ("\n\n", "train split: {f} holds no examples"),
])
def test_bad_rows_name_split_file_and_line(tmp_path, content, message):
    d = write_split_dir(tmp_path / "bad", {s: tiny_rows() for s in ("validation", "test")})
    f = d / "train.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_rotten_tomatoes(str(d))
    assert str(e.value).startswith(message.format(f=f))


def test_missing_split_non_utf8_and_missing_directory(tmp_path):
    d = write_split_dir(tmp_path / "d", {s: tiny_rows() for s in ("train", "validation")})
    with pytest.raises(DataError, match=r"test split: .*test.jsonl does not exist"):
        load_rotten_tomatoes(str(d))
    (d / "test.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DataError, match=r"test split: .*test.jsonl is not UTF-8"):
        load_rotten_tomatoes(str(d))
    # a name that is no directory here is a hub name (train.py and generate.py say first that a
    # path-like dataset= is missing: test_missing_dataset_directory)
    with pytest.raises(DataError, match=r"^cannot load dataset './no/such/dir' from the hub \("):
        load_rotten_tomatoes("./no/such/dir")


def test_batches_cover_the_split_once(data_dir):
    loader = CustomDataLoader(str(data_dir), block_size=1024)
    seen, padding = [], 0
    for x, y, _ in loader.batches("validation", 64):
        for row in range(x.size(0)):
            n = int((y[row] != IGNORE_INDEX).nonzero().max()) + 2  # prompt + answer length
            seen.append(x[row, :n - 1].tolist())
            padding += x.size(1) - (n - 1)
    assert sorted(seen) == sorted(ids[:-1] for ids, _ in loader.examples["validation"])
    assert padding < 0.05 * sum(len(s) for s in seen)  # grouped by length: little padding
    # eval_iters batches: a random sample of the split, the same every time, both labels in it
    some = [x for x, _, _ in loader.batches("validation", 8, max_batches=3)]
    again = [x for x, _, _ in loader.batches("validation", 8, 3)]
    assert len(some) == 3 and all(torch.equal(a, b) for a, b in zip(some, again))
    rows = [ids for x in some for ids in x.tolist()]
    answers = [next(t for t in reversed(row) if t != EOT) for row in rows]
    assert {POSITIVE, NEGATIVE} <= set(answers)  # the split's first 24 rows are all positive


def test_hub_path_reads_a_dataset_dict(data_dir, monkeypatch):
    import datasets
    load_json = datasets.load_dataset

    def fake_hub(name):
        assert name == "cornell-movie-review-data/rotten_tomatoes"  # what "rotten_tomatoes" resolves to
        return load_json("json", data_files={s: str(data_dir / f"{s}.jsonl")
                                             for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    splits = load_rotten_tomatoes("rotten_tomatoes")
    assert splits == load_rotten_tomatoes(str(data_dir))


def test_hub_rows_are_checked_and_hub_failures_are_one_line(monkeypatch):
    import datasets
    bad = datasets.DatasetDict({s: datasets.Dataset.from_list([{"text": "ok", "label": 1},
                                                               {"text": "", "label": 0}])
                                for s in ("train", "validation", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda name: bad)
    with pytest.raises(DataError, match="^train split: some/dataset row 1: 'text' is missing or empty$"):
        load_rotten_tomatoes("some/dataset")

    def offline(name):
        raise ConnectionError("Couldn't reach the hub\nmore details")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as e:
        load_rotten_tomatoes("rotten_tomatoes")
    assert str(e.value) == ("cannot load dataset 'rotten_tomatoes' from the hub (Couldn't reach the hub); "
                            "give a local copy instead: dataset=DIR, a directory with train.jsonl, "
                            "validation.jsonl, test.jsonl")
