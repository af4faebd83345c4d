"""Prefix tuning (Li & Liang, 2021): trained keys and values that every position attends to.

Each layer holds P key and P value vectors per head (prefix_k, prefix_v: (1, n_head, P, head size)),
placed before the sequence as if P earlier tokens had produced them: they shift the sequence's
positions by P, as Hugging Face PEFT's prefix tuning does. They are trained directly (PEFT's default;
Li & Liang's reparametrisation through an MLP is left out) and start as the keys and values the
pretrained model computes for P real tokens, so a fresh prefix model computes exactly the pretrained
model run on those tokens followed by the text. For gpt2-medium: 24 layers x 2 x P x 1024 parameters,
2,359,296 at P=48 (LoRA r=16's count).
"""
import torch
import torch.nn as nn

from model import KVCache


class Prefix(nn.Module):

    def __init__(self, n_head, head_size, length):
        super().__init__()
        self.prefix_k = nn.Parameter(torch.zeros(1, n_head, length, head_size))
        self.prefix_v = nn.Parameter(torch.zeros(1, n_head, length, head_size))

    def forward(self):
        return self.prefix_k, self.prefix_v


def add_prefixes(model, length):
    """Give each attention layer of model (a GPT) a prefix of length vectors, zero until init_prefixes;
    returns model."""
    for block in model.transformer.h:
        if block.attn.prefix is None:  # the model's empty hook
            heads = model.config.n_head
            block.attn.prefix = Prefix(heads, model.config.n_embd // heads, length)
    return model


@torch.no_grad()
def init_prefixes(model, tokens):
    """Start each layer's prefix as the keys and values model, without prefixes, computes for tokens."""
    kv_cache, mode = KVCache(model.config.n_layer), model.training
    idx = torch.tensor([tokens], device=model.lm_head.weight.device)
    model.eval().hidden_states(idx, kv_cache=kv_cache)
    for block, (k, v) in zip(model.transformer.h, kv_cache.layers):
        block.attn.prefix.prefix_k.copy_(k)
        block.attn.prefix.prefix_v.copy_(v)
    model.train(mode)


def mark_only_prefix_as_trainable(model):
    """Freeze every parameter of model except the prefixes' keys and values; returns model."""
    for name, param in model.named_parameters():
        param.requires_grad = ".prefix_" in name
    return model
