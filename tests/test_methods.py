"""BitFit, bottleneck adapters and prefix tuning beside LoRA: exact at the start, gradients only where they
belong, the parameter counts of their formulas, checkpoints of what trained, exact resume after a kill."""
import subprocess
import sys

import pytest
import torch

import generate
from conftest import KILLER, ROOT, greedy_one_at_a_time, losses, run_train
from harness.checkpoints import load_checkpoint, load_model
from prefix import init_prefixes
from finetune import apply_method
from model import GPT, GPTConfig, count_parameters
from test_run_safety import fails_with

SETTINGS = {"bitfit": dict(method="bitfit"), "adapter": dict(method="adapter", adapter_size=8),
            "prefix": dict(method="prefix", prefix_length=6)}
FLAGS = {"bitfit": [], "adapter": ["adapter_size=8"], "prefix": ["prefix_length=6"]}
TOKENS = [464, 3290, 318, 257, 922, 13]  # a prefix starts as these tokens' keys and values


def method_model(hf_gpt2_dir, method):
    model = apply_method(GPT.from_pretrained(str(hf_gpt2_dir), SETTINGS[method]))
    if method == "prefix":
        init_prefixes(model, TOKENS)
    return model


@pytest.fixture(scope="module")
def base(hf_gpt2_dir):
    return GPT.from_pretrained(str(hf_gpt2_dir)).eval()


def random_tokens(*shape, seed=0):
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["bitfit", "adapter"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_fresh_bitfit_or_adapter_model_computes_the_pretrained_logits_exactly(hf_gpt2_dir, base, method, mode):
    model = getattr(method_model(hf_gpt2_dir, method), mode)()
    idx = random_tokens(3, 17)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], base(idx)[0])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_fresh_prefix_model_is_the_pretrained_model_run_after_the_prefix_tokens(hf_gpt2_dir, base, mode):
    model = getattr(method_model(hf_gpt2_dir, "prefix"), mode)()
    idx = random_tokens(3, 17)
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = base(torch.cat([torch.tensor([TOKENS] * 3), idx], dim=1))[0][:, len(TOKENS):]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_prefix_model_evaluates_with_a_shared_start_padding_and_generation_as_its_definition(hf_gpt2_dir,
                                                                                                base):
    model = method_model(hf_gpt2_dir, "prefix").eval()
    start = random_tokens(9, seed=1).tolist()
    prompts = [start + random_tokens(n, seed=n).tolist() for n in (3, 11, 1, 7)]
    logits = model.prefill(prompts, model.start_cache(start))[0]
    answers = model.generate_batch(prompts, 4, start=model.start_cache(start))
    for prompt, row, answer in zip(prompts, logits, answers):
        with torch.no_grad():
            torch.testing.assert_close(row, base(torch.tensor([TOKENS + prompt]))[0][0, -1], rtol=0, atol=1e-5)
        assert answer == greedy_one_at_a_time(base, TOKENS + prompt, 4)


@pytest.mark.parametrize("method, trained", [
    ("bitfit", lambda name: name.endswith(".bias")),
    ("adapter", lambda name: ".adapter_" in name),
    ("prefix", lambda name: ".prefix." in name),
])
def test_gradients_reach_exactly_the_methods_parameters(hf_gpt2_dir, method, trained):
    model = method_model(hf_gpt2_dir, method).train()
    for name, param in model.named_parameters():
        if name.endswith("up.weight"):  # a fresh adapter's up-projection is zero: down would get no gradient
            torch.nn.init.normal_(param, std=0.02)
    idx = random_tokens(2, 12)
    _, loss = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert any(map(trained, names)) and not all(map(trained, names))
    for name, param in model.named_parameters():
        assert param.requires_grad == trained(name), name
        assert (param.grad is not None and param.grad.abs().max() > 0) == trained(name), name


MEDIUM = dict(n_layer=24, n_head=16, n_embd=1024)


@pytest.mark.parametrize("settings, formula", [
    (dict(lora_rank=16, lora_alpha=64.0), 3 * 24 * 16 * (1024 + 1024)),  # A and B of q, k and v
    (dict(method="bitfit"), 24 * (3 * 1024 + 1024 + 4 * 1024 + 1024 + 2 * 1024) + 1024),  # every bias
    (dict(method="adapter", adapter_size=24), 24 * 2 * (2 * 1024 * 24 + 24 + 1024)),  # two a block
    (dict(method="prefix", prefix_length=48), 24 * 2 * 48 * 1024),  # keys and values of every head
])
def test_trainable_parameters_are_the_formulas_for_gpt2_medium(settings, formula):
    with torch.device("meta"):
        model = apply_method(GPT(GPTConfig(**MEDIUM, **settings)))
    assert count_parameters(model)[0] == formula


def run_flags(hf_gpt2_dir, small_data_dir, method):
    return [f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", "max_iters=4", "eval_interval=2",
            f"method={method}", *FLAGS[method], "lr=1e-2", "dropout=0.1", "batch_size=8",
            "gradient_accumulation_steps=1", "eval_batch_size=32", "eval_test=false", "device=cpu"]


@pytest.mark.parametrize("method", ["bitfit", "adapter", "prefix"])
def test_a_method_run_keeps_only_what_trained_and_resumes_exactly_after_a_kill(hf_gpt2_dir, small_data_dir,
                                                                              tmp_path, method, capsys):
    flags = run_flags(hf_gpt2_dir, small_data_dir, method)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_train(*flags, f"out_dir={straight}")
    assert "lora_rank = 0" in capsys.readouterr().out.splitlines()
    checkpoint = load_checkpoint(straight / "ckpt_last.pt")
    expected = {name for name, p in method_model(hf_gpt2_dir, method).named_parameters() if p.requires_grad}
    assert set(checkpoint["model"]) == expected and checkpoint["base"]["init_from"] == str(hf_gpt2_dir)
    assert (checkpoint["model_args"]["method"], checkpoint["config"]["method"]) == (method, method)
    model = load_model(checkpoint)  # base weights from init_from, what trained from the checkpoint
    assert all(torch.equal(dict(model.named_parameters())[n], t) for n, t in checkpoint["model"].items())

    result = subprocess.run([sys.executable, "-c", KILLER, "validation_loss", "2", *flags,
                             f"out_dir={killed}", "resume=auto"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -9, result.stderr[-2000:]
    run_train(*flags, f"out_dir={killed}", "resume=auto")
    resumed = load_checkpoint(killed / "ckpt_last.pt")
    assert resumed["iter_num"] == 4 and losses(killed) == losses(straight)
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    rows = generate.main([f"out_dir={straight}", "device=cpu", "num_examples=8", "method=both"])
    assert [r["total"] for r in rows] == [8] * 4


@pytest.mark.parametrize("flags, message", [
    (["method=bitfit", "rank=8"], "lora_rank: not a setting of method=bitfit; drop the flag"),
    (["method=prefix", "adapter_size=8"], "adapter_size: not a setting of method=prefix; drop the flag"),
    (["prefix_length=8"], "prefix_length: not a setting of method=lora; drop the flag"),
    (["method=adapter", "init_from=scratch"], "method=adapter: init_from=scratch trains every weight of a new "
                                              "model (LoRA and the other methods adapt a pretrained one); drop "
                                              "the flag"),
    (["method=dora"], "method='dora': must be one of lora, bitfit, adapter, prefix"),
])
def test_settings_of_another_method_are_one_line(hf_gpt2_dir, small_data_dir, tmp_path, capsys, flags, message):
    fails_with(capsys, 2, f"train.py: error: {message}", run_train, f"init_from={hf_gpt2_dir}",
               f"dataset={small_data_dir}", f"out_dir={tmp_path / 'o'}", *flags)
    assert not (tmp_path / "o").exists()


def test_a_method_run_resumes_only_as_that_method(hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(*run_flags(hf_gpt2_dir, small_data_dir, "adapter"), f"out_dir={out}")
    fails_with(capsys, 2, f"train.py: error: method='prefix' differs from the checkpoint's method='adapter' in "
               f"{out / 'ckpt_last.pt'}; drop the flag or use a new out_dir", run_train,
               *run_flags(hf_gpt2_dir, small_data_dir, "prefix"), f"out_dir={out}", "resume=auto",
               "max_iters=6")


@pytest.fixture(scope="module")
def method_runs(hf_gpt2_dir, small_data_dir, tmp_path_factory):
    runs = {}
    for method in ("bitfit", "adapter", "prefix"):
        runs[method] = tmp_path_factory.mktemp(method)
        run_train(*run_flags(hf_gpt2_dir, small_data_dir, method), f"out_dir={runs[method]}", "max_iters=2")
    return runs


@torch.no_grad()
def test_prefix_tuning_exports_to_peft_and_bitfit_to_a_gpt2_with_our_logits(method_runs, hf_gpt2_dir,
                                                                          tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    from tools import export
    idx = random_tokens(2, 20)
    for method, fmt in (("prefix", "peft"), ("bitfit", "hf")):
        dest = tmp_path / method
        export.main([f"out_dir={method_runs[method]}", f"format={fmt}", f"dest={dest}"])
        ours = load_model(load_checkpoint(method_runs[method] / "ckpt.pt")).eval()(idx)[0]
        if fmt == "peft":
            theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_gpt2_dir), dest).eval()
        else:
            theirs = GPT2LMHeadModel.from_pretrained(dest).eval()
        torch.testing.assert_close(theirs(input_ids=idx).logits, ours, rtol=0, atol=1e-5)
        base = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
        assert (base(input_ids=idx).logits - ours).abs().max() > 1e-3, method  # training changed it


@pytest.mark.parametrize("method, fmt, why", [
    ("bitfit", "peft", "PEFT has no BitFit; format=hf writes a GPT-2 with its trained biases"),
    ("adapter", "peft", "PEFT has no bottleneck adapters for GPT-2, and a GPT-2 directory no place for them"),
    ("adapter", "hf", "a GPT-2 directory has no place for bottleneck adapters, nor PEFT for GPT-2"),
    ("prefix", "hf", "a GPT-2 directory has no place for prefixes; format=peft writes PEFT's prefix tuning"),
])
def test_what_cannot_be_exported_is_one_line(method_runs, tmp_path, capsys, method, fmt, why):
    from tools import export
    fails_with(capsys, 2, f"export.py: error: {method_runs[method] / 'ckpt.pt'} is a method={method} run: "
               f"{why}", export.main, [f"out_dir={method_runs[method]}", f"format={fmt}",
                                       f"dest={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()


def test_a_run_from_before_the_methods_resumes_evaluates_and_exports(hf_gpt2_dir, small_data_dir, tmp_path):
    from tools import export
    out = tmp_path / "old"
    flags = [f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", "rank=4", "alpha=16", "max_iters=2",
             "eval_interval=2", "batch_size=8", "gradient_accumulation_steps=1", "device=cpu"]
    run_train(*flags, f"out_dir={out}")
    for name in ("ckpt.pt", "ckpt_last.pt"):  # as the code before the methods wrote them
        checkpoint = torch.load(out / name, weights_only=True)
        for key in ("method", "adapter_size", "prefix_length"):
            del checkpoint["model_args"][key], checkpoint["config"][key]
        torch.save(checkpoint, out / name)
    run_train(*flags, f"out_dir={out}", "resume=auto", "max_iters=4")
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 4
    assert len(generate.main([f"out_dir={out}", "device=cpu", "num_examples=4"])) == 2
    export.main([f"out_dir={out}", "format=hf", f"dest={tmp_path / 'hf'}"])


@pytest.mark.parametrize("flags, message", [
    (["prefix_length=256"], "prefix_length=256: must be less than the 256-token context of {base}"),
    (["prefix_length=250"], "the 'default' prompt needs 23 tokens and its answer 5 more: more than the 6-token "
                            "context of init_from={base} beside prefix_length=250 (lower it)"),
])
def test_a_prefix_too_long_for_the_context_is_one_line(hf_gpt2_dir, small_data_dir, tmp_path, capsys, flags,
                                                       message):
    fails_with(capsys, 2, "train.py: error: " + message.format(base=hf_gpt2_dir), run_train,
               *run_flags(hf_gpt2_dir, small_data_dir, "prefix")[:-1], "eval_test=true", *flags,
               f"out_dir={tmp_path / 'o'}")


def test_another_methods_flag_on_resume_is_named_as_such(method_runs, hf_gpt2_dir, small_data_dir, capsys):
    fails_with(capsys, 2, "train.py: error: lora_alpha: not a setting of method=adapter; drop the flag",
               run_train, f"out_dir={method_runs['adapter']}", "resume=auto", "lora_alpha=8", "max_iters=4")


@pytest.mark.parametrize("damage", [
    lambda c: c["model"].pop("transformer.h.1.attn.prefix.prefix_v"),
    lambda c: c["model_args"].update(prefix_length=12),
])
def test_a_damaged_prefix_checkpoint_is_refused_by_export_in_one_line(method_runs, tmp_path, capsys, damage):
    import shutil
    from tools import export
    out = tmp_path / "copy"
    shutil.copytree(method_runs["prefix"], out)
    for name in ("ckpt.pt", "ckpt_last.pt"):
        checkpoint = torch.load(out / name, weights_only=True)
        damage(checkpoint)
        torch.save(checkpoint, out / name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        export.main([f"out_dir={out}", "format=peft", f"dest={tmp_path / 'e'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("export.py: error: the checkpoint's ") and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_a_few_shot_evaluation_of_a_raw_model_is_named_by_its_shots(hf_gpt2_dir, small_data_dir, tmp_path):
    rows = generate.main([f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={tmp_path}",
                          "shots=2", "method=logprob", "num_examples=4", "device=cpu"])
    assert [r["checkpoint"] for r in rows] == [f"2-shot {hf_gpt2_dir}"]
