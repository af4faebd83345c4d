"""The start-or-resume decision, a pure function of the flags and what out_dir holds, case by case."""
import pytest

import train
from harness.checkpoints import CheckpointError
from harness.flags import UsageError, parse_flags
from harness.run import start_or_resume

SAVED = dict(vars(parse_flags("train.py", train.FLAGS, ["out_dir=o", "init_from=base", "max_iters=4"])[0]))


def checkpoint(iter_num, run_id="a", base="lora", resume=True, **config):
    state = dict(run_id=run_id, iter_num=iter_num, config=dict(SAVED, **config),
                 base=dict(init_from="base", fingerprint="f") if base == "lora" else None)
    return dict(state, optimizer={}, scaler={}, rng=[{}]) if resume else state


def found(last=None, best=None, files=(), evaluations=(), metrics_run=None):
    names = set(files) | {name for name, c in (("ckpt_last.pt", last), ("ckpt.pt", best)) if c is not None}
    return dict(last=last, best=best, files=names, evaluations=list(evaluations), metrics_run=metrics_run)


def flags(*argv):
    given = {a.partition("=")[0] for a in argv}
    return parse_flags("train.py", train.FLAGS,
                       ["out_dir=o", *["init_from=base"] * ("init_from" not in given), *argv])


RUN = dict(last=checkpoint(2), best=checkpoint(2, resume=False), files=("metrics.jsonl",), metrics_run="a")
HELD = ("out_dir='o' holds an earlier run; continue it with resume=auto, replace it with overwrite=true, "
        "or choose another out_dir")
NO_LAST = ("out_dir='o' holds a run but no ckpt_last.pt to continue it from; nothing was changed: replace "
           "the run with overwrite=true, or choose another out_dir")
CASES = [  # (flags, out_dir as found, "start" | "resume" | the refusal)
    ([], found(), "start"),
    (["resume=auto"], found(), "start"),
    (["resume=auto"], found(files=["metrics.jsonl"]), "start"),  # killed before its first checkpoint
    # killed writing its first ckpt_last.pt
    (["resume=auto"], found(best=checkpoint(0, resume=False)), "start"),
    (["resume=auto"], found(best=checkpoint(0, resume=False), evaluations=[{"run_id": "a"}]), "start"),
    (["resume=auto"], found(best=checkpoint(2, resume=False)), NO_LAST),
    (["resume=auto"], found(evaluations=[{"run_id": None}]), NO_LAST),  # a zero-shot evaluation lives there
    (["resume=auto"], found(best=checkpoint(0, resume=False), evaluations=[{"run_id": "b"}]), NO_LAST),
    ([], found(**RUN), HELD),
    ([], found(files=["results.json"]), HELD),
    (["overwrite=true"], found(**RUN), "start"),
    (["overwrite=true", "resume=auto"], found(),
     "overwrite=true contradicts resume=auto and init_from=resume: give one of them"),
    (["resume=auto"], found(**RUN), "resume"),
    (["init_from=resume"], found(**RUN), "resume"),
    (["init_from=resume"], found(),
     "init_from=resume: no o/ckpt_last.pt to resume from; start the run with: python train.py out_dir=o"),
    (["resume=auto"], found(**dict(RUN, last=dict(checkpoint(2), rng=[{}, {}]))),
     "o/ckpt_last.pt was saved by 2 processes and this is 1; resume it with the same number "
     "(torchrun --nproc_per_node=2, or 1: python train.py)"),
    (["resume=auto"], found(**dict(RUN, best=None)),
     "o/ckpt_last.pt has no o/ckpt.pt beside it; continue the run from a whole copy of its out_dir"),
    (["resume=auto"], found(**dict(RUN, best=checkpoint(2, run_id="b", resume=False))),
     "these files belong to different runs: o/ckpt_last.pt (run a), o/ckpt.pt (run b)"),
    (["resume=auto"], found(**dict(RUN, metrics_run="b")), "o/metrics.jsonl holds rows of another run than "
                                                           "o/ckpt_last.pt's (a); nothing was changed"),
    (["resume=auto", "rank=8"], found(**RUN), "lora_rank=8 differs from the checkpoint's lora_rank=128 in "
                                              "o/ckpt_last.pt; drop the flag or use a new out_dir"),
    (["resume=auto", "seed=7"], found(**RUN), "seed=7 differs from the checkpoint's seed=1337 in "
                                              "o/ckpt_last.pt; drop the flag or use a new out_dir"),
    (["resume=auto", "prompt_template=question"], found(**RUN),
     "prompt_template='question' differs from the checkpoint's prompt_template='default' in o/ckpt_last.pt; "
     "drop the flag or use a new out_dir"),
    (["resume=auto", "mask_prompt=false"], found(**RUN),
     "mask_prompt=False differs from the checkpoint's mask_prompt=True in o/ckpt_last.pt; drop the flag or "
     "use a new out_dir"),
    (["resume=auto", "seed=1337", "mask_prompt=true"], found(**RUN), "resume"),  # its own values
    (["resume=auto", "init_from=scratch"], found(**RUN), "init_from=scratch starts a new model; the run in o "
                                                         "continues from its own: drop the flag or use a new "
                                                         "out_dir"),
    (["resume=auto", "max_iters=1"], found(**RUN),
     "out_dir='o' holds a run at iteration 2, past max_iters=1; nothing was changed: give max_iters=2 or "
     "more to continue it"),
    (["resume=auto"], found(**dict(RUN, best=checkpoint(6, resume=False, max_iters=8))),
     "o/ckpt.pt is at iteration 6, past o/ckpt_last.pt's 2: an extension to max_iters=8 was interrupted; "
     "continue it with that max_iters"),
    (["resume=auto", "init_from=moved"], found(**dict(RUN, last=checkpoint(2, base=None))),
     "init_from='moved' differs from the resumed run's init_from='base', and that run trains every weight, "
     "so it continues from its own; drop the flag or use a new out_dir"),
]


@pytest.mark.parametrize("argv, out_dir, expected", CASES)
def test_start_or_resume(argv, out_dir, expected):
    config, explicit = flags(*argv)
    if expected in ("start", "resume"):
        decided, resume = start_or_resume(config, explicit, out_dir)
        if expected == "start":
            assert resume is None and decided is config
        else:  # the run's own config, from its ckpt_last.pt
            assert resume is out_dir["last"] and decided is not config and decided.max_iters == 4
    else:
        with pytest.raises((UsageError, CheckpointError)) as e:
            start_or_resume(config, explicit, out_dir)
        assert str(e.value) == expected


def test_a_resumed_run_takes_the_flags_given_now_and_keeps_its_own_for_the_rest():
    config, explicit = flags("resume=auto", "max_iters=8", "lr=1e-3", "device=cpu", "init_from=moved")
    decided, _ = start_or_resume(config, explicit, found(**RUN))
    assert (decided.max_iters, decided.learning_rate, decided.device) == (8, 1e-3, "cpu")  # given now
    # the run's; its base weights found elsewhere
    assert decided.lora_rank == 128 and decided.init_from == "moved"
