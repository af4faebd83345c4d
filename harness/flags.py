"""Command-line flags in, one-line errors out.

A flag is `key=value`, `--key=value` or `--key value` (a bare `--flag` is true), typed as its default (a
list default repeats); `-` and `_` are alike; rank, alpha and lr stand for lora_rank, lora_alpha and
learning_rate. A mistake exits with status 2 and one line naming the flag.
"""
import contextlib
import difflib
import sys
from types import SimpleNamespace

ALIASES = {"rank": "lora_rank", "alpha": "lora_alpha", "lr": "learning_rate"}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
RULES = {  # a flag's optional third entry: one of these, or a tuple of the values allowed
    "> 0": (lambda v: v > 0, "must be positive"),
    ">= 0": (lambda v: v >= 0, "must be >= 0"),
    "[0, 1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "[0, 2**32)": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
}


class UsageError(Exception):
    """A mistake the user can fix (a flag, a file, a disk): one line, exit status 2."""


class Diverged(RuntimeError):
    """The loss or the weights are no longer finite: one line, exit status 1 (rerunning will not help)."""


def fail(program, message, status=2):
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(status)


@contextlib.contextmanager
def reported_errors(program, debug=False, also=()):
    """A usage error (or one of also), a failed write, a diverged run or Ctrl-C: one line (debug: a
    traceback)."""
    try:
        yield
    except (UsageError, OSError, Diverged, KeyboardInterrupt, *also) as e:
        if debug:
            raise
        if isinstance(e, KeyboardInterrupt):
            fail(program, "interrupted; every file is whole (train.py continues with resume=auto)", 130)
        fail(program, e, 1 if isinstance(e, Diverged) else 2)


def parse_flags(program, flags, argv, summary=""):
    """flags: {name: (default, help[, allowed])}. Returns (config, the names given); exits on -h."""
    if "-h" in argv or "--help" in argv:
        print(help_text(program, flags, summary))
        sys.exit(0)
    try:
        return parse(flags, argv)
    except UsageError as e:
        fail(program, e)


def parse(flags, argv):
    """(config, the names given) of argv, or a UsageError naming what is wrong."""
    values, given, args = defaults(flags), set(), list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") and (arg.startswith("-") or "=" not in arg):
            raise UsageError(f"{arg!r} is not a flag (flags are key=value or --key=value; -h lists them)")
        name, has_value, text = arg.removeprefix("--").partition("=")
        key = canonical(name, flags)
        value = convert(key, text if has_value else value_after(args, name, flags), flags)
        if isinstance(flags[key][0], list):
            value = (getattr(values, key) if key in given else []) + [value]
        elif key in given:
            raise UsageError(f"{key} is given twice ({getattr(values, key)!r} and {value!r}); give it once")
        setattr(values, key, value)
        given.add(key)
    for key, (_, _, *rule) in flags.items():
        check(key, getattr(values, key), rule[0] if rule else None)
    return values, given


def defaults(flags, **changes):
    """The settings a command has when no flag is given, with changes (for calls from other code)."""
    assert set(changes) <= set(flags), set(changes) - set(flags)
    return SimpleNamespace(**{key: spec[0] for key, spec in flags.items()} | changes)


def canonical(name, flags):
    key = ALIASES.get(name.strip().replace("-", "_"), name.strip().replace("-", "_"))
    if key not in flags:
        close = difflib.get_close_matches(key, list(flags) + list(ALIASES), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "-h lists the flags"
        raise UsageError(f"unknown flag {name!r} ({hint})")
    return key


def value_after(args, name, flags):
    """The value of a bare --name: the next argument, unless that is a flag; a bare boolean is true."""
    following = args[0] if args else "--"
    if isinstance(flags[canonical(name, flags)][0], bool):
        return args.pop(0) if following.strip().lower() in TRUE + FALSE else "true"
    named = following.partition("=")[0].replace("-", "_")
    if following.startswith("--") or ("=" in following and ALIASES.get(named, named) in flags):
        raise UsageError(f"--{name} needs a value")
    return args.pop(0)


def convert(key, text, flags):
    default, text = flags[key][0], text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if isinstance(default, bool):
        if text.lower() not in TRUE + FALSE:
            raise UsageError(f"{key}={text!r}: expected true or false")
        return text.lower() in TRUE
    if isinstance(default, (int, float)):
        try:
            value = type(default)(text)
        except ValueError:
            kind = "an integer" if type(default) is int else "a number"
            raise UsageError(f"{key}={text!r}: expected {kind}") from None
        if value != value or abs(value) == float("inf"):
            raise UsageError(f"{key}={text!r}: expected a finite number")
        return value
    return text


def check(key, value, rule):
    if isinstance(rule, tuple) and value not in rule:
        allowed = " or ".join(rule) if len(rule) == 2 else "one of " + ", ".join(v or "''" for v in rule)
        raise UsageError(f"{key}={value!r}: must be {allowed}")
    if isinstance(rule, str) and not RULES[rule][0](value):
        raise UsageError(f"{key}={value!r}: {RULES[rule][1]}")


def help_text(program, flags, summary):
    width = max(len(f"{key}={spec[0]!r}") for key, spec in flags.items())
    lines = [f"usage: python {program} [key=value ...]", "", summary.strip(), "",
             "flags (also --key=value or --key value; '-' and '_' are interchangeable):"]
    for key, (default, text, *rule) in flags.items():
        allowed = [r if isinstance(r, str) else ", ".join(v or repr("") for v in r) for r in rule]
        lines.append(f"  {f'{key}={default!r}':<{width}}  {text}" + "".join(f" ({a})" for a in allowed))
    aliases = [f"{alias} = {key}" for alias, key in ALIASES.items() if key in flags]
    return "\n".join(lines + (["", "aliases: " + ", ".join(aliases)] if aliases else []))
