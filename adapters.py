"""Bottleneck adapters (Houlsby et al., 2019) after each attention and MLP sublayer.

An adapter maps a sublayer's output h (.., n_embd) to h + up(gelu(down(h))), down: n_embd -> size and
up: size -> n_embd, each with a bias, before the residual add. up starts at zero, so a fresh adapter is the
identity and the model computes exactly the pretrained one. Two adapters a block train 2 (2 n_embd size +
size + n_embd) parameters; for gpt2-medium (24 blocks of 1024) at size 24: 2,409,600, close to LoRA r=16's
2,359,296.
"""
import torch.nn as nn
import torch.nn.functional as F


class Adapter(nn.Module):

    def __init__(self, n_embd, size):
        super().__init__()
        self.down = nn.Linear(n_embd, size)
        self.up = nn.Linear(size, n_embd)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.down.weight, std=0.02)  # near identity at the start, as in the paper
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(F.gelu(self.down(h)))


def add_adapters(model, size):
    """Put a fresh adapter of this size after each attention and MLP sublayer of model (a GPT); returns
    model."""
    for block in model.transformer.h:
        if isinstance(block.adapter_attn, nn.Identity):  # the model's empty hooks
            block.adapter_attn = Adapter(model.config.n_embd, size)
            block.adapter_mlp = Adapter(model.config.n_embd, size)
    return model


def mark_only_adapters_as_trainable(model):
    """Freeze every parameter of model except its adapters'; returns model."""
    for name, param in model.named_parameters():
        param.requires_grad = ".adapter_" in name
    return model
