import json

import pytest

from tools import bench


def test_smoke_run_writes_every_measurement(data_dir, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["smoke=true", f"out={out}", f"dataset={data_dir}", "device=cpu"])
    result = json.loads(out.read_text())
    rows = {(r["what"], r["who"]): r for r in result["rows"]}
    for what, who in [("train LoRA r=128", "ours"), ("train LoRA r=128", "transformers+peft"),
                      ("train full fine-tuning", "ours"), ("train full fine-tuning", "transformers")]:
        row = rows[(what, who)]
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["reviews_per_s"] > 0
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # no peak known for a CPU
    for label in bench.METHODS:  # the other methods on the same batches
        row = rows[(f"train {label}", "ours")]
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0 and row["loss"] > 0
    for who in ("ours", "ours, no sharing"):
        assert (rows[("train LoRA r=128", who)]["speedup"] > 0
                and rows[("train full fine-tuning", who)]["speedup"] > 0)
    for split in ("4 x 2", "2 x 4", "1 x 8"):  # train.py's own step, one update split three ways
        row = rows[(f"train.py step of 8 reviews as {split}", "ours")]
        assert row["tokens_per_s"] > 0 and row["step_ms"] > 0
    # same weights, same batches, same optimizer: full fine-tuning must agree on the loss
    ours, theirs = (rows[("train full fine-tuning", "ours")]["loss"],
                    rows[("train full fine-tuning", "transformers")]["loss"])
    assert abs(ours - theirs) < 1e-4 * abs(theirs)
    for label in ("LoRA r=128", "full fine-tuning, dropout 0.05"):
        shared, unshared = (rows[(f"saved for backward, {label}", "ours")],
                            rows[(f"saved for backward, {label}", "ours, no sharing")])
        assert shared["tokens_per_review"] == unshared["tokens_per_review"] == 101
        # the instruction is kept once per batch
        assert 0 < shared["mib_per_review"] < unshared["mib_per_review"]
    for who in ("ours", "ours, no sharing", "transformers"):
        assert rows[("evaluate 24 reviews, batched", who)]["seconds"] > 0
    for who in ("ours", "ours, no sharing"):
        assert rows[("validation loss, 1066 reviews", who)]["seconds"] > 0
    for who in ("ours", "transformers"):
        assert rows[("evaluate one review at a time (mean of 2)", who)]["ms_per_review"] > 0
    end_to_end = rows[("default experiment end to end", "ours")]
    parts = end_to_end["train_steps_s"] + end_to_end["validation_s"] + end_to_end["loop_rest_s"]
    assert (0 < end_to_end["train_steps_s"] and 0 < end_to_end["validation_s"]
            and -0.02 <= end_to_end["loop_rest_s"])
    assert parts == pytest.approx(end_to_end["loop_s"]) and end_to_end["loop_s"] < end_to_end["seconds"]
    assert result["device"] == "cpu" and result["shape"] == bench.TINY


def test_flops_per_token_counts():
    shape = bench.MEDIUM
    full = bench.training_flops_per_token(shape, 0, 50, 2)
    lora = bench.training_flops_per_token(shape, 128, 50, 2)
    body = 2 * 12 * 24 * 1024 ** 2
    assert full == 3 * (body + 2 * 24 * 1024 * 50 + 2 * 50257 * 1024 * 2 / 50)
    assert lora == 2 * (body + 2 * 50257 * 1024 * 2 / 50) + 3 * 2 * 24 * 1024 * 50 + 3 * 12 * 24 * 1024 * 128
    assert 4 * 12 * 24 * 1024 ** 2 < lora < full


def test_t4_projection_scales_by_the_peak_ratio():
    rows = [dict(what="train LoRA r=128", who="ours", tokens_per_s=98900.0),
            dict(what="train LoRA r=128", who="transformers+peft", tokens_per_s=50000.0),
            dict(what="evaluate 1066 reviews, batched", who="ours", seconds=0.5),
            dict(what="default experiment end to end", who="ours", seconds=40.0)]
    projected = bench.t4_projection(rows, "NVIDIA H100 80GB HBM3", tokens_per_review=50)
    assert [r["what"] for r in projected] == ["projected T4: train LoRA r=128",
                                              "projected T4: evaluate 1066 reviews, batched"]
    train, evaluate = projected
    assert train["tokens_per_s"] == pytest.approx(98900.0 * 65 / 989, rel=1e-12)
    assert train["seconds"] == pytest.approx(80 * 128 * 50 / train["tokens_per_s"], rel=1e-12)
    assert evaluate["seconds"] == pytest.approx(0.5 * 989 / 65, rel=1e-12)
    assert all("peak ratio 65/989" in r["note"] for r in projected)
    assert (bench.t4_projection(rows, "NVIDIA H100 PCIe", 50)[0]["tokens_per_s"]
            == pytest.approx(98900.0 * 65 / 756, rel=1e-12))
    assert bench.t4_projection(rows, "Tesla T4", 50) == [] and bench.t4_projection(rows, "cpu", 50) == []
