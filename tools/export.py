"""Export a run's checkpoint to the Hugging Face ecosystem.

    python -m tools.export out_dir=runs/r16_a64 format=peft dest=adapters/r16_a64   # a PEFT LoRA adapter
    python -m tools.export out_dir=runs/r16_a64 format=hf dest=models/r16_a64       # a merged GPT-2
    python -m tools.export out_dir=runs/prefix format=peft dest=adapters/prefix     # PEFT prefix tuning

format=peft writes adapter_config.json and adapter_model.safetensors, which PEFT applies to the base
model: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), dest). GPT-2 computes q, k
and v in one fused c_attn layer, so our three adapters become one: the three A matrices stacked, the
three B matrices on the diagonal of one block matrix, with rank 3r and alpha 3 alpha (the same
scaling alpha / r). format=hf merges the update into the weights and writes a GPT2LMHeadModel
directory (config.json, model.safetensors) that transformers loads, and that is a valid init_from.

The other methods: a BitFit run is a GPT-2 with other biases (format=hf); a prefix-tuning run is PEFT's
prefix tuning (format=peft: every layer's keys and values as its prompt_embeddings); bottleneck
adapters have no place in either (PEFT has no Houlsby adapters for GPT-2), so they are used here only.
"""
import json
import os
import shutil
import sys

import torch

from harness.checkpoints import UMASK, load_model, model_config
from harness.flags import UsageError, parse_flags, reported_errors
from harness.run import OutDir, check_out_dir

FLAGS = {
    "out_dir": ("out", "the run to export"),
    "ckpt": ("best", "best (ckpt.pt) or last (ckpt_last.pt)", ("best", "last")),
    "format": ("peft", "peft (a LoRA or prefix-tuning adapter for Hugging Face PEFT) or hf (a merged Hugging "
                       "Face GPT-2: LoRA, BitFit, full fine-tuning)", ("peft", "hf")),
    "dest": ("", "the directory to write; it must not exist yet, or be empty"),
    "base": ("", "a LoRA run's base model where it is no longer at the run's init_from (name or directory)"),
    "debug": (False, "show full tracebacks"),
}


UNEXPORTABLE = {  # (method, format): why not
    ("bitfit", "peft"): "PEFT has no BitFit; format=hf writes a GPT-2 with its trained biases",
    ("adapter", "peft"): "PEFT has no bottleneck adapters for GPT-2, and a GPT-2 directory no place for them",
    ("adapter", "hf"): "a GPT-2 directory has no place for bottleneck adapters, nor PEFT for GPT-2",
    ("prefix", "hf"): "a GPT-2 directory has no place for prefixes; format=peft writes PEFT's prefix tuning",
}


def peft_adapter(checkpoint, base):
    """(adapter_config, tensors): a LoRA checkpoint as one PEFT adapter on each layer's c_attn, of base."""
    args = checkpoint["model_args"]
    lora = checkpoint["model"]
    tensors = {}
    for layer in range(args["n_layer"]):
        ours, theirs = f"transformer.h.{layer}.attn", f"base_model.model.transformer.h.{layer}.attn.c_attn"
        # c_attn(x) = [q | k | v]: A stacks the three rank-r codes, a block-diagonal B sends each to its part
        tensors[f"{theirs}.lora_A.weight"] = torch.cat([lora[f"{ours}.{p}_attn.lora_A"] for p in "qkv"])
        B = [lora[f"{ours}.{p}_attn.lora_B"] for p in "qkv"]
        tensors[f"{theirs}.lora_B.weight"] = torch.block_diag(*B)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base,
                  r=3 * args["lora_rank"], lora_alpha=3 * args["lora_alpha"],
                  lora_dropout=args["lora_dropout"], target_modules=["c_attn"], fan_in_fan_out=True,
                  bias="none", inference_mode=True)
    return config, {k: v.contiguous() for k, v in tensors.items()}


def peft_prefix(checkpoint, base):
    """(adapter_config, tensors): a prefix-tuning checkpoint as PEFT's, whose prompt_embeddings row p
    holds each layer's key and then value of position p, heads side by side."""
    args, prefix = checkpoint["model_args"], checkpoint["model"]
    rows = [prefix[f"transformer.h.{layer}.attn.prefix.prefix_{kv}"][0].transpose(0, 1).flatten(1)
            for layer in range(args["n_layer"]) for kv in "kv"]  # each (P, n_embd)
    config = dict(peft_type="PREFIX_TUNING", task_type="CAUSAL_LM", base_model_name_or_path=base,
                  num_virtual_tokens=args["prefix_length"], token_dim=args["n_embd"],
                  num_transformer_submodules=1, num_attention_heads=args["n_head"],
                  num_layers=args["n_layer"], encoder_hidden_size=args["n_embd"], prefix_projection=False,
                  inference_mode=True)
    return config, {"prompt_embeddings": torch.cat(rows, dim=1).contiguous()}


def write_peft(checkpoint, base, dest):
    from safetensors.torch import save_file
    prefix = checkpoint["model_args"].get("method") == "prefix"
    config, tensors = (peft_prefix if prefix else peft_adapter)(checkpoint, base)
    with open(os.path.join(dest, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(dest, "adapter_model.safetensors"), metadata={"format": "pt"})


def write_hf(model, dest):
    from safetensors.torch import save_file
    from transformers import GPT2Config
    c = model.config
    GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
               n_head=c.n_head, resid_pdrop=c.dropout, embd_pdrop=c.dropout,
               attn_pdrop=c.dropout).save_pretrained(dest)
    save_file(hf_state_dict(model.eval()), os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def hf_state_dict(model):
    """The inverse of GPT.load_hf_state_dict: model's weights (LoRA merged in eval mode) as a
    GPT2LMHeadModel state dict, q, k and v fused into c_attn, Conv1D weights stored (in, out)."""
    sd = model.state_dict()
    hf_sd = {}
    for key, value in sd.items():
        if "lora_" in key or key == "lm_head.weight" or ".k_attn." in key or ".v_attn." in key:
            continue  # k and v join q in c_attn; lm_head is tied to wte
        if ".q_attn." in key:
            prefix, kind = key.rsplit(".q_attn.", 1)
            fused = torch.cat([sd[f"{prefix}.{proj}.{kind}"] for proj in ("q_attn", "k_attn", "v_attn")])
            hf_sd[f"{prefix}.c_attn.{kind}"] = fused.t() if kind == "weight" else fused
        else:
            hf_sd[key] = value.t() if key.endswith(("c_fc.weight", "c_proj.weight")) else value
    return {k: v.contiguous() for k, v in hf_sd.items()}


def check_dest(dest):
    if not dest:
        raise UsageError("dest= is required: the directory to write the export to")
    if os.path.islink(dest):
        raise UsageError(f"dest={dest!r} is a symbolic link; name a new directory")
    if os.path.isdir(dest) and os.listdir(dest):
        raise UsageError(f"dest={dest!r} exists and is not empty; choose a new directory")
    check_out_dir(dest, "dest")


def export(config):
    check_dest(config.dest)
    with OutDir(config.out_dir, "export.py") as out:  # no run changes the files while they are read
        (_, checkpoint), = out.checkpoints((config.ckpt,))
        path = out.file("ckpt.pt" if config.ckpt == "best" else "ckpt_last.pt")
        if checkpoint["base"] is None and (config.format == "peft" or config.base):
            raise UsageError(f"{path} is not a LoRA run (it trained every weight): it needs no base=, and "
                             "exports with format=hf")
        method = model_config(checkpoint).method  # its model_args and tensors agree, or refused
        if (method, config.format) in UNEXPORTABLE:
            raise UsageError(f"{path} is a method={method} run: {UNEXPORTABLE[method, config.format]}")
        latest = out.latest()["base"]  # where the base weights are now
        base = config.base or (latest and latest["init_from"])
        if config.format == "peft":
            if config.base:
                load_model(checkpoint, base)  # the weights it trained on, or refused
            write_directory(config.dest, lambda tmp: write_peft(checkpoint, base, tmp))
        else:
            model = load_model(checkpoint, base)
            write_directory(config.dest, lambda tmp: write_hf(model, tmp))
    kind = f"PEFT {'prefix-tuning' if method == 'prefix' else 'LoRA'} adapter" if config.format == "peft" \
        else "Hugging Face GPT2LMHeadModel"
    print(f"wrote {config.dest} ({kind}) from {path} (iteration {checkpoint['iter_num']})")


def write_directory(dest, write):
    """Fill a temporary directory beside dest, then rename it into place: a failure leaves no
    half-written export."""
    parent, name = os.path.split(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what an export killed while writing left
    os.mkdir(tmp, 0o700)
    try:
        write(tmp)
        for name in os.listdir(tmp):  # the usual permissions, not the temporary's owner-only ones
            os.chmod(os.path.join(tmp, name), 0o666 & ~UMASK)
        os.chmod(tmp, 0o777 & ~UMASK)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv):
    config, _ = parse_flags("export.py", FLAGS, argv, __doc__)
    with reported_errors("export.py", config.debug):
        export(config)


if __name__ == "__main__":
    main(sys.argv[1:])
