"""export.py: a run's adapter for PEFT, or its merged model for transformers, with our logits."""
import contextlib
import json
import os
import shutil

import pytest
import torch
from transformers import GPT2LMHeadModel

from harness.flags import defaults
from tools import export
import generate
from harness.checkpoints import base_fingerprint, load_checkpoint, load_model
from conftest import last_wins, run_train, save_random_hf_gpt2
from dataloader import encode_prompt, get_tokenizer, load_rotten_tomatoes
from finetune import apply_method
from model import GPT

IDX = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lora_run(hf_gpt2_dir, small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=2",
              "rank=8", "alpha=32", "lr=1e-2")
    return out


@pytest.fixture(scope="module")
def full_run(hf_gpt2_dir, small_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full_run")
    run_train(f"init_from={hf_gpt2_dir}", f"dataset={small_data_dir}", f"out_dir={out}", "max_iters=2",
              "rank=0", "lr=1e-3")
    return out


@torch.no_grad()
def our_logits(path):
    model = load_model(load_checkpoint(path)).eval()
    return model(IDX)[0], model


@torch.no_grad()
def test_peft_loads_the_adapter_with_our_logits(lora_run, hf_gpt2_dir, tmp_path, capsys):
    from peft import PeftModel
    dest = tmp_path / "adapter"
    export.main([f"out_dir={lora_run}", "format=peft", f"dest={dest}"])
    assert capsys.readouterr().out == (f"wrote {dest} (PEFT LoRA adapter) from {lora_run / 'ckpt.pt'} "
                                       "(iteration 2)\n")
    assert sorted(os.listdir(dest)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((dest / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (24, 96.0, ["c_attn"])
    assert config["base_model_name_or_path"] == str(hf_gpt2_dir) and config["fan_in_fan_out"] is True
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_gpt2_dir), dest).eval()
    ours, _ = our_logits(lora_run / "ckpt.pt")
    torch.testing.assert_close(theirs(IDX).logits, ours, rtol=0, atol=1e-5)
    base = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir).eval()
    assert (base(IDX).logits - ours).abs().max() > 1e-2  # the adapter really changes the model


def greedy_continuations(hf, prompts, n):
    """transformers' greedy continuation of each prompt, as generate.py reads it (up to end of text)."""
    out = []
    for prompt in prompts:
        tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             pad_token_id=50256)[0, len(prompt):].tolist()
        cut = next((i + 1 for i, t in enumerate(tokens) if t == 50256), len(tokens))
        out.append(tokens[:cut])
    return out


@pytest.mark.parametrize("run", ["lora_run", "full_run"])
def test_merged_model_loads_in_transformers_with_our_logits_and_answers(run, request, small_data_dir,
                                                                        tmp_path):
    out = request.getfixturevalue(run)
    dest = tmp_path / "merged"
    export.main([f"out_dir={out}", "ckpt=last", "format=hf", f"dest={dest}"])
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors"]
    hf = GPT2LMHeadModel.from_pretrained(dest).eval()
    ours, model = our_logits(out / "ckpt_last.pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(IDX).logits, ours, rtol=0, atol=1e-5)

    records = load_rotten_tomatoes(str(small_data_dir))["test"][:12]
    predicted = generate.predict_labels(model, records, "generate", defaults(generate.FLAGS),
                                        contextlib.nullcontext())
    prompts = [encode_prompt(r["text"]) for r in records]
    enc = get_tokenizer()
    expected = [enc.decode([t for t in tokens if t != 50256])
                for tokens in greedy_continuations(hf, prompts, 5)]
    assert [p["continuation"] for p in predicted] == expected
    # the directory is a valid init_from: generate.py on it answers as on the checkpoint
    generate.main([f"init_from={dest}", f"dataset={small_data_dir}", f"out_dir={tmp_path / 'zero'}",
                   "device=cpu"])
    generate.main([f"out_dir={out}", "ckpt=last", "device=cpu"])
    from_dir = json.loads((tmp_path / "zero" / "results.json").read_text())["predictions"][0]["records"]
    from_run = json.loads((out / "results.json").read_text())["predictions"][0]["records"]
    assert [r["continuation"] for r in from_dir] == [r["continuation"] for r in from_run]


@pytest.mark.parametrize("flags", [["format=peft"], ["format=hf", "base=gpt2"]])
def test_peft_and_base_need_a_lora_run(full_run, tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as e:
        export.main([f"out_dir={full_run}", *flags, f"dest={tmp_path / 'a'}"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"export.py: error: {full_run / 'ckpt.pt'} is not a LoRA run "
                                       "(it trained every weight): it needs no base=, and exports with "
                                       "format=hf\n")
    assert os.listdir(tmp_path) == []


def test_a_killed_export_leaves_nothing_the_next_one_keeps(lora_run, tmp_path, monkeypatch):
    import safetensors.torch

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill while the tensors are written
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(SystemExit) as e:  # Ctrl-C: one line, exit status 130
        export.main([f"out_dir={lora_run}", "format=peft", f"dest={tmp_path / 'adapter'}"])
    assert e.value.code == 130
    os.makedirs(tmp_path / ".adapter.export.tmp", exist_ok=True)  # as a SIGKILL would have left it
    (tmp_path / ".adapter.export.tmp" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    export.main([f"out_dir={lora_run}", "format=peft", f"dest={tmp_path / 'adapter'}"])
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no hidden temporary left beside it
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("flags, message", [
    (["format=onnx"], "format='onnx': must be peft or hf"),
    (["ckpt=middle"], "ckpt='middle': must be best or last"),
    (["dest="], "dest= is required: the directory to write the export to"),
    (["dest={tmp}/full"], "dest='{tmp}/full' exists and is not empty; choose a new directory"),
    (["dest={tmp}/full/keep.txt/x"],
     "dest='{tmp}/full/keep.txt/x' cannot be created: {tmp}/full/keep.txt is a file"),
    (["dest={tmp}/link"], "dest='{tmp}/link' is a symbolic link; name a new directory"),
    (["out_dir={tmp}/nothing"],
     "no checkpoint at {tmp}/nothing/ckpt.pt; make one with: python train.py out_dir={tmp}/nothing"),
    (["format=hf", "base={tmp}/nothing"], "base='{tmp}/nothing': no such directory"),
    (["format=hf", "base={tmp}/full"], "base='{tmp}/full': cannot load GPT-2 weights from '{tmp}/full': "
                                       "expected gpt2, gpt2-medium, gpt2-large, gpt2-xl, a GPT-2 hub id or a "
                                       "local Hugging Face GPT-2 directory ("),
])
def test_bad_input_is_one_line_and_writes_nothing(lora_run, tmp_path, capsys, flags, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    flags = [f.format(tmp=tmp_path) for f in flags]
    with pytest.raises(SystemExit) as e:
        export.main(last_wins(f"out_dir={lora_run}", f"dest={tmp_path / 'new'}", *flags))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("export.py: error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["full", "link"] and os.listdir(tmp_path / "full") == ["keep.txt"]


def test_an_adapter_is_refused_on_another_base(lora_run, hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    other = tmp_path / "other"
    save_random_hf_gpt2(other, seed=1)  # same shape, other weights
    fingerprint = load_checkpoint(lora_run / "ckpt.pt")["base"]["fingerprint"]
    other_fingerprint = base_fingerprint(apply_method(
        GPT.from_pretrained(str(other), dict(lora_rank=8, lora_alpha=32.0))))
    message = (f"the adapter was trained on {hf_gpt2_dir} (weights {fingerprint}), not on {other} "
               f"(weights {other_fingerprint}); give the base it was trained on")
    capsys.readouterr()
    for main, flags in ((generate.main, ["ckpt=best", "device=cpu", f"dataset={small_data_dir}"]),
                        (export.main, ["format=hf", f"dest={tmp_path / 'merged'}"])):
        with pytest.raises(SystemExit) as e:
            main([f"out_dir={lora_run}", f"base={other}", *flags])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"{main.__module__.split('.')[-1]}.py: error: {message}\n"
    assert not (tmp_path / "merged").exists()
    # the same weights in another place are the same base
    moved = tmp_path / "moved"
    shutil.copytree(hf_gpt2_dir, moved)
    export.main([f"out_dir={lora_run}", "format=hf", f"dest={tmp_path / 'merged'}", f"base={moved}"])
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("key", ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                                 "transformer.h.1.attn.c_proj.weight", "transformer.wte.weight"])
def test_a_base_with_one_row_changed_is_another_base(lora_run, hf_gpt2_dir, tmp_path, key):
    from harness.checkpoints import CheckpointError
    edited = GPT2LMHeadModel.from_pretrained(hf_gpt2_dir)
    with torch.no_grad():
        edited.state_dict()[key][5] += 1.0
    edited.save_pretrained(tmp_path / "edited")
    checkpoint = load_checkpoint(lora_run / "ckpt.pt")
    with pytest.raises(CheckpointError, match=f"^the adapter was trained on {hf_gpt2_dir} \\(weights "):
        load_model(checkpoint, str(tmp_path / "edited"))
    load_model(checkpoint, str(hf_gpt2_dir))  # the same weights are the same base
