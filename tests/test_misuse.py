"""What a careless user does: move a run's base or data, change the step or the sizes on resume, give flags
that do not apply. Each either works or stops in one line that names the fix."""
import json
import os

import pytest
import torch

import generate
import train
from conftest import run_train, save_random_hf_gpt2, tiny_run_flags
from harness.checkpoints import load_checkpoint
from model import GPT, GPTConfig
from test_run_safety import fails_with
from tools import export


@pytest.fixture
def moved_base(small_data_dir, tmp_path):
    """A LoRA run and a full fine-tuning run whose base (a relative init_from) has since moved."""
    base = tmp_path / "base"
    save_random_hf_gpt2(base)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name, rank in (("lora", "rank=8"), ("full", "rank=0")):
            run_train(*tiny_run_flags("base", small_data_dir, tmp_path / name)[:-1], rank, "max_iters=2")
    finally:
        os.chdir(cwd)
    os.rename(base, tmp_path / "moved")
    return tmp_path


def test_a_full_fine_tuning_run_resumes_without_its_moved_base(moved_base, capsys):
    out = moved_base / "full"
    run_train("init_from=resume", f"out_dir={out}", "max_iters=3")  # every weight is in the checkpoint
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 3
    fails_with(capsys, 2, f"train.py: error: init_from={str(moved_base / 'moved')!r} differs from the resumed "
               "run's init_from='base', and that run trains every weight, so it continues from its own; drop the "
               "flag or use a new out_dir", run_train, "resume=auto", f"out_dir={out}",
               f"init_from={moved_base / 'moved'}", "max_iters=4")


def test_a_lora_run_records_its_base_where_it_is_now(moved_base, capsys):
    out = moved_base / "lora"
    assert load_checkpoint(out / "ckpt.pt")["base"]["init_from"] == str(moved_base / "base")  # absolute
    run_train("resume=auto", f"out_dir={out}", f"init_from={moved_base / 'moved'}", "max_iters=3", "batch_size=8",
              "gradient_accumulation_steps=1")
    assert load_checkpoint(out / "ckpt_last.pt")["base"]["init_from"] == str(moved_base / "moved")
    generate.main([f"out_dir={out}", "text=a fine film", "device=cpu"])  # ckpt.pt's old place is not used
    assert capsys.readouterr().out.rstrip().endswith("a fine film")
    export.main([f"out_dir={out}", "format=peft", f"dest={moved_base / 'adapter'}"])
    config = json.loads((moved_base / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(moved_base / "moved")


def test_resuming_with_another_step_size_is_refused_and_another_split_is_not(finished_run, hf_gpt2_dir,
                                                                             small_data_dir, capsys):
    out, before = finished_run  # 8 reviews a step
    flags = tiny_run_flags(hf_gpt2_dir, small_data_dir, out)
    fails_with(capsys, 2, "train.py: error: batch_size x gradient_accumulation_steps = 4 reviews a step, where "
               "the run took 8: it would repeat or skip reviews; resume with a product of 8", run_train, *flags,
               "batch_size=4", "max_iters=6")
    run_train(*flags, "batch_size=4", "gradient_accumulation_steps=2", "max_iters=6")
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 6


def test_the_sizes_printed_and_saved_are_the_models(finished_run, hf_gpt2_dir, small_data_dir, capsys):
    out, _ = finished_run  # a 2-layer, 64-wide model of 256 positions, trained without size flags
    saved = load_checkpoint(out / "ckpt.pt")["config"]
    assert [saved[k] for k in train.SIZES] == [2, 4, 64, 256]
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "n_layer=2", "max_iters=6")  # the true value
    assert "n_layer = 2" in capsys.readouterr().out.splitlines()
    fails_with(capsys, 2, f"train.py: error: n_layer=3: {hf_gpt2_dir} has n_layer=2; only init_from=scratch "
               "takes the sizes given", run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, out / "new")[:-1],
               "n_layer=3")


@pytest.mark.parametrize("block_size, message", [
    (20, "the 'default' prompt needs 23 tokens and its answer 1 more: more than the 20-token context of "
         "init_from=scratch (raise block_size)"),
    (24, "428 of 428 reviews would be cut short to fit the 24-token context of init_from=scratch (raise "
         "block_size)"),
])
def test_a_context_too_short_for_the_reviews_stops_before_training_without_eval_test(small_data_dir, tmp_path,
                                                                                    capsys, block_size, message):
    fails_with(capsys, 2, f"train.py: error: {message}", run_train, "init_from=scratch", f"block_size={block_size}",
               f"dataset={small_data_dir}", f"out_dir={tmp_path / 'o'}", "eval_test=false")
    assert not (tmp_path / "o").exists()


def test_a_step_that_torchrun_cannot_divide_is_one_line_before_anything_loads(hf_gpt2_dir, small_data_dir,
                                                                              tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(GPT, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    fails_with(capsys, 2, "train.py: error: batch_size x gradient_accumulation_steps = 3 reviews a step do not "
               "divide among 2 processes", run_train, *tiny_run_flags(hf_gpt2_dir, small_data_dir, tmp_path / "o"),
               "batch_size=3")


@torch.no_grad()
def test_a_tiny_temperature_samples_the_likeliest_token():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=2, n_embd=32)).eval()
    prompts = [[5, 6, 7], [9, 10]]
    greedy = model.generate_batch(prompts, 6)
    for temperature in (1e-40, 1e-30, 1e-8):  # (logits / 1e-40) would overflow float32 into inf and nan
        assert model.generate_batch(prompts, 6, temperature=temperature) == greedy
        assert model.generate_batch(prompts, 6, temperature=temperature, top_k=3) == greedy


@pytest.mark.parametrize("flags, message", [
    (["top_k=50"], "top_k=50 samples among the likeliest tokens: give a temperature > 0 too (temperature=0 is "
                   "greedy)"),
    (["init_from={base}", "ckpt=best"], "ckpt choose a run's checkpoints and their base; init_from={base!r} is a "
                                        "raw GPT-2 (zero-shot)"),
    (["base={base}"], "base={base!r}: the run in {out} trains every weight; it needs no base"),
])
def test_flags_that_do_not_apply_are_refused(moved_base, capsys, flags, message):
    out, base = moved_base / "full", str(moved_base / "moved")
    fails_with(capsys, 2, "generate.py: error: " + message.format(base=base, out=out), generate.main,
               [f"out_dir={out}", "device=cpu", *(f.format(base=base) for f in flags)])


def test_an_evaluation_beside_a_run_is_never_called_complete(evaluated_run, hf_gpt2_dir, small_data_dir):
    out = evaluated_run
    before = (out / "results.json").read_bytes()
    generate.main([f"out_dir={out}", f"init_from={hf_gpt2_dir}", "device=cpu", f"dataset={small_data_dir}",
                   "method=both"])
    last = json.loads((out / "last_evaluation.json").read_text())
    assert last["complete"] is False and (out / "results.json").read_bytes() == before
    assert [r["settings"]["method"] for r in last["results"]] == ["generate", "logprob"]  # each row's own


@pytest.fixture
def evaluated_run(hf_gpt2_dir, small_data_dir, tmp_path):
    out = tmp_path / "run"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1], "eval_test=true")
    return out



# found by a second careless user, after the items above were fixed

def test_a_checkpoint_of_another_run_is_refused_even_when_only_the_other_is_asked_for(
        finished_run, hf_gpt2_dir, small_data_dir, tmp_path, capsys):
    out, _ = finished_run
    other = tmp_path / "other"
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, other)[:-1], "prompt_template=question")
    (out / "ckpt.pt").write_bytes((other / "ckpt.pt").read_bytes())
    runs = [load_checkpoint(p)["run_id"] for p in (other / "ckpt.pt", out / "ckpt_last.pt")]
    message = (f"these files belong to different runs: {out / 'ckpt.pt'} (run {runs[0]}), "
               f"{out / 'ckpt_last.pt'} (run {runs[1]})")
    fails_with(capsys, 2, f"generate.py: error: {message}", generate.main,
               [f"out_dir={out}", "ckpt=best", "device=cpu"])
    fails_with(capsys, 2, f"export.py: error: {message}", export.main,
               [f"out_dir={out}", "format=peft", f"dest={tmp_path / 'adapter'}"])
    assert not (out / "results.json").exists() and not (tmp_path / "adapter").exists()


def test_a_row_of_a_checkpoint_that_has_since_changed_is_dropped_at_the_next_write(
        evaluated_run, hf_gpt2_dir, small_data_dir):
    out = evaluated_run  # evaluated at iteration 4, then extended without a test evaluation
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    generate.main([f"out_dir={out}", "ckpt=best", "device=cpu"])
    rows = json.loads((out / "results.json").read_text())["results"]
    best = load_checkpoint(out / "ckpt.pt")["iter_num"]
    assert [(r["checkpoint"], r["iter_num"]) for r in rows] == [("Best Val Checkpoint", best)]


def test_overwrite_replaces_a_run_whose_checkpoints_are_damaged(finished_run, hf_gpt2_dir, small_data_dir):
    out, before = finished_run
    (out / "ckpt_last.pt").write_bytes(before["ckpt_last.pt"][:20000])
    (out / "ckpt.pt").write_bytes(b"")
    run_train(*tiny_run_flags(hf_gpt2_dir, small_data_dir, out)[:-1], "overwrite=true")
    assert load_checkpoint(out / "ckpt_last.pt")["iter_num"] == 4


@pytest.mark.parametrize("edit, part", [
    (lambda c: c.update(base="x"), "base"),
    (lambda c: c["base"].update(init_from=None), "base"),
    (lambda c: c.update(run_id=["a"]), "run_id"),
    (lambda c: c.update(iter_num="4"), "iter_num"),
    (lambda c: c.update(config={}), "config"),
    (lambda c: c["config"].pop("dataset"), "config"),
    (lambda c: c.update(rng=None), "rng"),
    (lambda c: c.update(optimizer=[]), "optimizer"),
    (lambda c: c.update(optimizer={}), "optimizer"),
    (lambda c: c.update(rng=[{}]), "rng"),
    (lambda c: c.update(best_val_loss="x"), "best_val_loss"),
])
def test_a_checkpoint_with_a_damaged_part_is_one_line(finished_run, hf_gpt2_dir, small_data_dir, capsys,
                                                      edit, part):
    out, _ = finished_run
    path = out / "ckpt_last.pt"
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)
    message = f"{path} is damaged: its {part} is not what train.py writes"
    fails_with(capsys, 2, f"train.py: error: {message}", run_train,
               *tiny_run_flags(hf_gpt2_dir, small_data_dir, out), "max_iters=6")
    fails_with(capsys, 2, f"generate.py: error: {message}", generate.main, [f"out_dir={out}", "device=cpu"])


def test_a_model_args_head_count_of_zero_is_one_line(finished_run, capsys):
    out, _ = finished_run
    for name in ("ckpt.pt", "ckpt_last.pt"):
        checkpoint = torch.load(out / name, weights_only=True)
        checkpoint["model_args"]["n_head"] = 0
        torch.save(checkpoint, out / name)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        generate.main([f"out_dir={out}", "device=cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: the checkpoint's model_args are inconsistent")


def test_lora_flags_with_a_model_from_scratch_are_refused_and_its_rank_is_saved_as_zero(
        small_data_dir, tmp_path, capsys):
    flags = ["init_from=scratch", f"dataset={small_data_dir}", "n_layer=1", "n_embd=32", "n_head=2",
             "block_size=128", "max_iters=1", "batch_size=8", "gradient_accumulation_steps=1"]
    fails_with(capsys, 2, "train.py: error: lora_alpha, lora_rank: init_from=scratch trains every weight of "
               "a new model (LoRA and the other methods adapt a pretrained one); drop the flag", run_train,
               *flags, "rank=8", "alpha=32", f"out_dir={tmp_path / 'a'}")
    run_train(*flags, f"out_dir={tmp_path / 'b'}")
    assert "lora_rank = 0" in capsys.readouterr().out.splitlines()
    assert load_checkpoint(tmp_path / "b" / "ckpt.pt")["config"]["lora_rank"] == 0


def test_a_submission_zip_that_cannot_be_written_is_one_line(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run([sys.executable, "-m", "tools.report", "submission",
                             str(tmp_path / "no" / "x.zip")], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stderr) == (
        2, f"report.py: error: could not write {tmp_path / 'no' / 'x.zip'} (No such file or directory); the "
           "previous file, if any, is intact\n")
