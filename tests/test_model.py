import math
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel

from harness.device import autocast
from conftest import ROOT, checkpoint_of, greedy_one_at_a_time, save_random_hf_gpt2
from lora import LoRALinear, mark_only_lora_as_trainable
from harness.checkpoints import base_fingerprint, load_model
from model import GPT, GPTConfig, KVCache, count_parameters
from dataloader import common_start


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear) and m.is_lora()]


@pytest.mark.parametrize("rank", [0, 8])
def test_logits_match_hugging_face(hf_gpt2_dir, rank):
    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    model = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=rank, lora_alpha=16.0)).eval()
    assert len(lora_layers(model)) == (6 if rank else 0)
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, none = model(idx)
        theirs = hf(idx).logits
    assert none is None and ours.shape == (3, 40, 50257)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_greedy_generation_matches_hugging_face(hf_gpt2_dir):
    hf = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    model = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=8, lora_alpha=16.0)).eval()
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(1))
    theirs = hf.generate(idx, max_new_tokens=10, do_sample=False, pad_token_id=50256)[0, 12:].tolist()
    assert model.generate_batch(idx.tolist(), 10) == [theirs]
    assert greedy_one_at_a_time(model, idx[0].tolist(), 10) == theirs  # the tests' reference loop


def test_other_size_loads_its_own_config(tmp_path):
    hf = save_random_hf_gpt2(tmp_path, n_layer=3, n_head=4, n_embd=96, n_positions=128, seed=5)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (3, 4, 96, 128, 50257)
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


def test_loading_skips_the_random_init_and_seeds_the_lora_init(hf_gpt2_dir, monkeypatch):
    initialised = []
    real_normal = torch.nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        initialised.append(tensor.device.type)
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", normal_)
    torch.manual_seed(3)
    model = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=8, lora_alpha=16.0))
    mark_only_lora_as_trainable(model)
    copy = load_model(checkpoint_of(model, dict(init_from=str(hf_gpt2_dir),
                                                fingerprint=base_fingerprint(model))))
    assert initialised and set(initialised) == {"meta"}  # GPT-2's random init touched no real weight
    torch.manual_seed(3)
    again = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=8, lora_alpha=16.0))
    for m in (model, copy, again):
        assert m.lm_head.weight is m.transformer.wte.weight
    for layer, twin, same in zip(lora_layers(model), lora_layers(again), lora_layers(copy)):
        assert torch.equal(layer.lora_A, twin.lora_A) and torch.equal(layer.lora_A, same.lora_A)
        assert 0 < layer.lora_A.abs().max() <= 1 / math.sqrt(64) and not layer.lora_B.any()  # kaiming bound
    assert len({float(layer.lora_A.sum()) for layer in lora_layers(model)}) == 6
    for key, value in copy.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_eval_forward_computes_the_common_start_once_with_the_same_loss(hf_gpt2_dir, monkeypatch):
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=8, lora_alpha=16.0))
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    generator = torch.Generator().manual_seed(2)
    start = torch.randint(0, 50257, (19,), generator=generator).tolist()
    rows = [start + torch.randint(0, 50257, (n,), generator=generator).tolist() for n in (5, 30, 12, 2)]
    idx = torch.full((4, 49), 50256)
    targets = torch.full((4, 49), -100)
    for i, row in enumerate(rows):  # right-padded, targets on each row's last two tokens, as in training
        idx[i, :len(row)] = torch.tensor(row)
        targets[i, len(row) - 3:len(row) - 1] = idx[i, len(row) - 2:len(row)]
    shared_starts = []
    monkeypatch.setattr(KVCache, "share",  # counts each start shared, by its length
                        lambda self, real=KVCache.share: (shared_starts.append(len(self)), real(self)))
    model.eval()
    shared = common_start(rows)
    assert shared == 19
    with torch.no_grad():
        logits, _ = model(idx, n_shared=shared)
        none, loss = model(idx, targets, reduction="sum", n_shared=shared)
        reference, _ = model(idx)
        _, unshared_loss = model(idx, targets, reduction="sum")
    assert shared_starts == [19, 19]  # computed once per batch, with and without targets
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)
    keep = targets != -100
    assert none is None
    torch.testing.assert_close(
        loss, torch.nn.functional.cross_entropy(reference[keep], targets[keep], reduction="sum"))
    torch.testing.assert_close(
        unshared_loss, torch.nn.functional.cross_entropy(reference[keep], targets[keep], reduction="sum"),
        rtol=0, atol=0)
    model(idx)
    assert shared_starts == [19, 19]  # shared=0 computes every row whole


ROWS = {"a shared start": (19, (5, 30, 12, 2)), "nothing shared": (0, (20, 25, 9, 30)),
        "very different lengths": (19, (1, 80, 3, 150))}


def training_model_and_batch(hf_gpt2_dir, rows, rank):
    """A GPT-2 (LoRA with a trained-looking B where rank > 0) and a right-padded batch of four rows
    whose targets are each row's last two tokens, as in training."""
    torch.manual_seed(0)
    model = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=rank, lora_alpha=16.0))
    if rank:
        mark_only_lora_as_trainable(model)
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.05)
    generator = torch.Generator().manual_seed(3)
    shared, lengths = ROWS[rows]
    start = torch.randint(0, 50257, (shared,), generator=generator).tolist()
    tokens = [start + torch.randint(0, 50257, (n,), generator=generator).tolist() for n in lengths]
    if not shared:
        assert len({t[0] for t in tokens}) == len(tokens)
    T = max(map(len, tokens))
    idx, targets = torch.full((4, T), 50256), torch.full((4, T), -100)
    for i, row in enumerate(tokens):
        idx[i, :len(row)] = torch.tensor(row)
        targets[i, len(row) - 3:len(row) - 1] = idx[i, len(row) - 2:len(row)]
    return model.train(), idx, targets, common_start(tokens)


def loss_and_gradients(model, idx, targets, shared, dtype="float32"):
    model.zero_grad(set_to_none=True)
    with autocast("cpu", dtype):
        _, loss = model(idx, targets, reduction="sum", n_shared=shared)
    loss.backward()
    return loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("rank", [8, 0])
def test_training_computes_the_common_start_once_with_the_same_loss_and_gradients(hf_gpt2_dir, rows, rank,
                                                                                  monkeypatch):
    model, idx, targets, shared = training_model_and_batch(hf_gpt2_dir, rows, rank)
    assert shared == ROWS[rows][0]
    shared_starts = []
    monkeypatch.setattr(KVCache, "share",  # counts each start shared, by its length
                        lambda self, real=KVCache.share: (shared_starts.append(len(self)), real(self)))
    results = {share: loss_and_gradients(model, idx, targets, shared if share else 0)
               for share in (True, False)}
    assert shared_starts == ([19] if ROWS[rows][0] else [])  # computed once, as a batch of one
    (shared_loss, shared_grads), (loss, grads) = results[True], results[False]
    torch.testing.assert_close(shared_loss, loss, rtol=0, atol=1e-5)
    assert set(shared_grads) == set(grads) and len(grads) == (12 if rank else 36)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_under_autocast_the_shared_start_is_as_accurate_as_every_row_whole(hf_gpt2_dir, dtype, monkeypatch):
    model, idx, targets, start = training_model_and_batch(hf_gpt2_dir, "a shared start", rank=8)
    exact_loss, exact = loss_and_gradients(model, idx, targets, 0)
    shared_starts = []
    monkeypatch.setattr(KVCache, "share",  # counts each start shared, by its length
                        lambda self, real=KVCache.share: (shared_starts.append(len(self)), real(self)))
    (shared_loss, shared), (whole_loss, whole) = (loss_and_gradients(model, idx, targets, n, dtype)
                                                  for n in (start, 0))
    assert shared_starts == [19]
    assert abs(shared_loss - exact_loss) <= 2 * abs(whole_loss - exact_loss) + 1e-3 * exact_loss
    for name, grad in exact.items():  # rounding of the lower precision, and nothing more
        scale = grad.abs().max()
        assert whole[name].dtype == torch.float32 and scale > 0, name
        assert (shared[name] - grad).abs().max() <= 2 * (whole[name] - grad).abs().max() + 1e-3 * scale, name


def test_lora_model_with_trained_B_merges_and_demerges(hf_gpt2_dir):
    model = GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=8, lora_alpha=16.0))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        before, _ = model(idx)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.02)
    model.train()
    with torch.no_grad():
        unmerged, _ = model(idx)
    model.eval()
    assert all(layer.has_weights_merged for layer in lora_layers(model))
    with torch.no_grad():
        merged, _ = model(idx)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)
    assert (merged - before).abs().max() > 1e-3  # the update really changes the output
    model.train()
    assert not any(layer.has_weights_merged for layer in lora_layers(model))
    for name, param in model.named_parameters():
        if "lora_B" not in name:
            torch.testing.assert_close(param, base[name], rtol=0, atol=1e-6)


def test_only_lora_gets_gradients_in_a_gpt(hf_gpt2_dir):
    model = mark_only_lora_as_trainable(
        GPT.from_pretrained(str(hf_gpt2_dir), dict(lora_rank=4, lora_alpha=8.0)))
    idx = torch.randint(0, 50257, (2, 10))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert len(with_grad) == 2 * 3 * 2


def test_gpt2_medium_lora_parameter_count(capsys):
    config = GPTConfig(n_layer=24, n_head=16, n_embd=1024, lora_rank=128, lora_alpha=512.0)
    with torch.device("meta"):
        model = mark_only_lora_as_trainable(GPT(config))
    trainable, total = count_parameters(model)
    assert trainable == 24 * 3 * 128 * (1024 + 1024) == 18_874_368
    assert total == 354_823_168 + 18_874_368  # gpt2-medium (tied lm_head counted once) + LoRA


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (2, 8))
    targets = torch.randint(0, 50, (2, 8))
    targets[:, :5] = -100
    none, loss = model(idx, targets)
    full, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(full.view(-1, 50), targets.view(-1), ignore_index=-100)
    assert none is None and full.shape == (2, 8, 50)
    torch.testing.assert_close(loss, expected)


def test_sampling_is_seeded_and_top_k_limits_choices():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts = [[0, 0, 0], [5, 7]]
    torch.manual_seed(7)
    first = model.generate_batch(prompts, 20, temperature=1.0, top_k=1)
    assert first == model.generate_batch(prompts, 20, temperature=0)  # top_k=1 is greedy
    assert first[0] == greedy_one_at_a_time(model, prompts[0], 20)
    torch.manual_seed(7)
    a = model.generate_batch(prompts, 20, temperature=1.5)
    torch.manual_seed(7)
    assert a == model.generate_batch(prompts, 20, temperature=1.5) and a != first


def test_unknown_name_and_empty_directory_are_clear_errors(tmp_path, monkeypatch):
    from harness.checkpoints import loading_weights
    from harness.flags import UsageError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (str(tmp_path), "no-such-model-xyz"):
        with pytest.raises(UsageError) as e, loading_weights("init_from", name):
            GPT.from_pretrained(name)
        assert str(e.value).startswith(f"init_from={name!r}: cannot load GPT-2 weights from {name!r}: "
                                       "expected gpt2, gpt2-medium, gpt2-large, gpt2-xl, a GPT-2 hub id or a "
                                       "local Hugging Face GPT-2 directory (")
        assert str(e.value).endswith("; a local copy works too: init_from=DIR") and "\n" not in str(e.value)
    with pytest.raises(AssertionError):  # only dropout and LoRA's settings may differ from the checkpoint's
        GPT.from_pretrained(str(tmp_path), dict(n_layer=3))


def test_importing_model_pulls_no_datasets_or_wandb():
    code = "import sys, model; print(sorted({'datasets', 'wandb', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
