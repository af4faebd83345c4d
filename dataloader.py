"""Rotten Tomatoes as instruction-tuning data: each review becomes its instr_tuned_text, `<prompt>
positive` or `<prompt> negative` (the prompt ends with `Label:`), then <|endoftext|>. For few-shot
prompting, labelled train reviews (demonstrations) in the same template go before a review's prompt."""
import hashlib
import json
import os
from functools import lru_cache

import torch

PROMPT_TEMPLATES = {
    "default": ("Instruction: Classify the sentiment of the movie review as positive or negative.\n"
                "Text: {text}\nLabel:"),
    "question": ("Movie review: {text}\nQuestion: Did the reviewer like the movie, positive or negative?\n"
                 "Answer:"),
}
LABEL_WORDS = {1: " positive", 0: " negative"}  # the leading space: GPT-2 sees "Label:" then " positive"
SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # a target with this value adds nothing to the loss (cross_entropy's default)
HUB_NAMES = {"rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes"}
CONTENT_FREE = ("N/A", "[MASK]", "")  # reviews that say nothing: contextual calibration (Zhao et al. 2021)


class DataError(Exception):
    """A dataset, a prompt or tokenizer files that cannot be used; the message says which and where."""


@lru_cache(maxsize=None)
def get_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # the BPE files are downloaded once, then read from tiktoken's cache
        raise DataError(f"cannot get the GPT-2 tokenizer's files ({type(e).__name__}); connect to the "
                        "internet once, or set TIKTOKEN_CACHE_DIR to a directory that holds them") from None


def get_sentiment_prompt(text, label=None, template="default"):
    """The instruction prompt for a review; with a label (1 or 0, or the words positive or
    negative), the answer follows it. label None or '' gives the prompt alone."""
    prompt = PROMPT_TEMPLATES[template].format(text=text)
    if label is None or label == "":
        return prompt
    if isinstance(label, str):
        label = {"positive": 1, "negative": 0}.get(label.strip().lower(), label)
    if isinstance(label, bool) or label not in (0, 1):
        raise ValueError(f"label must be 1, 0, 'positive', 'negative' or None, got {label!r}")
    return prompt + LABEL_WORDS[label]


def encode_prompt(text, template="default", max_tokens=None, prefix=""):
    """The token ids of prefix (demonstrations, if any) and the review's prompt, the review cut short (never
    the template or the prefix) where they would pass max_tokens."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary(prefix + get_sentiment_prompt(text, template=template))
    if max_tokens is None or len(ids) <= max_tokens:
        return ids
    review = enc.encode_ordinary(text)
    while len(ids) > max_tokens and review:  # cut the review's tokens by the excess, and encode again
        review = review[:max(0, len(review) - (len(ids) - max_tokens))]
        ids = enc.encode_ordinary(prefix + get_sentiment_prompt(enc.decode(review), template=template))
    if len(ids) > max_tokens:
        raise DataError(f"the '{template}' template alone is longer than {max_tokens} tokens")
    return ids


def check_prompt_room(template, block_size, answer_tokens, model="the model"):
    """Fail early where model's context cannot hold a prompt and the answer tokens after it."""
    needed = len(encode_prompt("x", template))
    if needed + answer_tokens > block_size:
        raise DataError(f"the '{template}' prompt needs {needed} tokens and its answer {answer_tokens} more: "
                        f"more than the {block_size}-token context of {model}")


def draw_demonstrations(splits, shots, seed):
    """The ids of shots train reviews to show before each review (few-shot prompting): shots // 2 of each
    label and, where shots is odd, one more of a label drawn with seed; in an order drawn with seed. A
    train review whose text is also in another split is never drawn."""
    elsewhere = {r["text"].strip() for split in splits if split != "train" for r in splits[split]}
    generator = torch.Generator().manual_seed(seed)
    counts = [shots // 2, shots // 2]
    if shots % 2:
        counts[int(torch.randint(2, (1,), generator=generator))] += 1
    ids = []
    for label, count in enumerate(counts):
        pool = [i for i, r in enumerate(splits["train"])
                if r["label"] == label and r["text"].strip() not in elsewhere]
        if count > len(pool):
            raise DataError(f"shots={shots}: the train split has {len(pool)} reviews labelled {label} to "
                            f"draw {count} from")
        ids += [pool[i] for i in torch.randperm(len(pool), generator=generator)[:count].tolist()]
    return [ids[i] for i in torch.randperm(len(ids), generator=generator).tolist()]


def few_shot_prefix(demonstrations, template="default"):
    """The text that goes before a review's prompt: each demonstration ({"text", "label"}) in the template
    with its label word, then a blank line."""
    return "".join(get_sentiment_prompt(r["text"], r["label"], template) + "\n\n" for r in demonstrations)


def check_demonstrations_fit(demonstrations, records, template, block_size, answer_tokens):
    """Fail early where the demonstrations, the longest review's prompt and its answer pass the context."""
    prefix = len(get_tokenizer().encode_ordinary(few_shot_prefix(demonstrations, template)))
    longest = max(len(encode_prompt(r["text"], template)) for r in records)
    if prefix + longest + answer_tokens > block_size:
        raise DataError(f"shots={len(demonstrations)}: the demonstrations take {prefix} tokens, the longest "
                        f"review's prompt {longest} and its answer {answer_tokens}: more than the "
                        f"{block_size}-token context; give fewer shots")


def sample(items, n, seed=0):
    """n of items drawn at random with a fixed seed (the splits are sorted by label, so their first n
    would not do), in their order; all of them where n is 0 or more than there are."""
    if not 0 < n < len(items):
        return list(items)
    keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return [items[i] for i in keep.tolist()]


def by_length(items, batch_size, length=len):
    """items in batches of similar length, so that little padding is computed."""
    ordered = sorted(items, key=length)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def load_rotten_tomatoes(dataset="rotten_tomatoes"):
    """{split: [{"text", "label"}, ...]} from the Hugging Face hub through `datasets`, or from a local
    copy: a directory of train/validation/test.jsonl, one {"text": ..., "label": 0 or 1} a line."""
    if os.path.isdir(dataset):
        return {split: read_jsonl(os.path.join(dataset, f"{split}.jsonl"), split) for split in SPLITS}
    try:
        from datasets import load_dataset  # only the hub path needs it
        hub = load_dataset(HUB_NAMES.get(dataset, dataset))
    except Exception as e:
        reason = (str(e).splitlines() or [repr(e)])[0]
        raise DataError(f"cannot load dataset {dataset!r} from the hub ({reason}); give a local copy "
                        "instead: dataset=DIR, a directory with train.jsonl, validation.jsonl, "
                        "test.jsonl") from None
    if any(s not in hub or len(hub[s]) == 0 for s in SPLITS):
        raise DataError(f"hub dataset {dataset} lacks a split of {', '.join(SPLITS)}, or it is empty")
    return {split: [checked(rec, f"{split} split: {dataset} row {n}") for n, rec in enumerate(hub[split])]
            for split in SPLITS}


def read_jsonl(path, split):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise DataError(f"{split} split: {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{split} split: {path} is not UTF-8 ({e.reason} at byte {e.start})") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records += [checked(json.loads(line), f"{split} split: {path}:{n}")] if line.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{split} split: {path}:{n}: malformed JSON ({e.msg})") from None
    if not records:
        raise DataError(f"{split} split: {path} holds no examples")
    return records


def checked(rec, where):
    """A dataset's row as {"text", "label"}: a review and 0 or 1; else one line that says where."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object with 'text' and 'label'")
    if not isinstance(rec.get("text"), str) or not rec["text"].strip():
        raise DataError(f"{where}: 'text' is missing or empty")
    if rec.get("label") not in (0, 1) or isinstance(rec.get("label"), bool):
        raise DataError(f"{where}: 'label' must be 0 or 1, got {rec.get('label')!r}")
    return {"text": rec["text"], "label": rec["label"]}


def fingerprint(splits):
    """A short hash of the splits' reviews and labels: the same data in another place has the same one."""
    return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()[:16]


def common_start(rows):
    """How many tokens every token list in rows starts with (at least one of each is left over): the
    instruction, which the model then computes once for the whole batch."""
    if len(rows) < 2:
        return 0
    return min(len(os.path.commonprefix(rows)), min(map(len, rows)) - 1)


class CustomDataLoader:
    """Tokenized splits (from a hub name, a local directory, or splits read by load_rotten_tomatoes)
    and padded (x, y) batches."""

    def __init__(self, dataset="rotten_tomatoes", block_size=1024, prompt_template="default",
                 mask_prompt=True, seed=1337):
        self.template, self.mask_prompt, self.seed = prompt_template, mask_prompt, seed
        splits = dataset if isinstance(dataset, dict) else load_rotten_tomatoes(dataset)
        self.records, self.examples, self.truncated = {}, {}, 0
        for split, records in splits.items():
            self.records[split] = [self._add_instruction_finetuning(dict(r)) for r in records]
            self.examples[split] = [self._example(r, block_size) for r in self.records[split]]

    def _add_instruction_finetuning(self, rec):
        rec["instr_tuned_text"] = get_sentiment_prompt(rec["text"], rec["label"], self.template)
        return rec

    def _example(self, rec, block_size):
        """(ids, prompt length): the tokens of instr_tuned_text and <|endoftext|>, the review cut short
        where they would not fit the context, and how many of them are the prompt."""
        enc = get_tokenizer()
        ids = enc.encode_ordinary(rec["instr_tuned_text"]) + [enc.eot_token]
        prompt = encode_prompt(rec["text"], self.template)
        if ids[:len(prompt)] != prompt:
            raise DataError("instr_tuned_text must start with the prompt's tokens and add the answer after "
                            f"them (as 'Label:' then ' positive'), got {rec['instr_tuned_text'][-40:]!r}")
        if len(ids) > block_size + 1:  # x is ids[:-1], so the text may be one token longer than the context
            answer = ids[len(prompt):]
            prompt = encode_prompt(rec["text"], self.template, block_size + 1 - len(answer))
            ids = prompt + answer
            self.truncated += 1
        return ids, len(prompt)

    def train_examples(self, start, count):
        """Training examples start .. start + count - 1 of a stream of epochs, each a permutation drawn
        from seed + epoch: a step's examples follow from its number alone (so resuming is exact)."""
        n = len(self.examples["train"])
        epochs = {e: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + e)).tolist()
                  for e in range(start // n, (start + count - 1) // n + 1)}
        return [self.examples["train"][epochs[i // n][i % n]] for i in range(start, start + count)]

    def collate(self, examples):
        """(x, y, n_shared): right-padded inputs, shifted targets (IGNORE_INDEX at padding, and at the
        prompt with mask_prompt), and how many tokens every row starts with."""
        T = max(len(ids) for ids, _ in examples) - 1
        x = torch.full((len(examples), T), get_tokenizer().eot_token, dtype=torch.long)
        y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(examples):
            ids = torch.tensor(ids, dtype=torch.long)
            x[row, :len(ids) - 1] = ids[:-1]
            y[row, :len(ids) - 1] = ids[1:]
            if self.mask_prompt:
                y[row, :n_prompt - 1] = IGNORE_INDEX
        return x, y, common_start([ids[:-1] for ids, _ in examples])

    def batches(self, split, batch_size, max_batches=0):
        """[(x, y, n_shared)] over a split, grouped by length to pad little; with max_batches > 0, over
        max_batches x batch_size of its examples drawn at random (the same ones every time)."""
        examples = sample(self.examples[split], max_batches * batch_size)
        return [self.collate(batch) for batch in by_length(examples, batch_size, lambda e: len(e[0]))]
