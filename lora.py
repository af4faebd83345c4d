"""Low-rank adaptation (Hu et al., 2021) of a linear layer.

y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, where fine-tuning trains only A (r x in) and
B (out x r) (mark_only_lora_as_trainable freezes W and b). B starts at zero, so a fresh LoRA layer
computes exactly its base layer. eval() merges the update into W (one matmul, as without LoRA);
train() puts back the W it merged into.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Linear):

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 lora_rank=0, lora_alpha=0.0, lora_dropout=0.0):
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        # nn.Linear.__init__ calls reset_parameters() before the LoRA matrices exist
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.has_weights_merged = False
        if lora_rank > 0:
            # A and B are made frozen; mark_only_lora_as_trainable (or another method) decides what trains
            self.lora_dropout = nn.Dropout(lora_dropout)
            self.lora_scaling = lora_alpha / lora_rank
            self.lora_A = nn.Parameter(
                torch.empty(lora_rank, in_features, device=device, dtype=dtype), requires_grad=False)
            self.lora_B = nn.Parameter(
                torch.empty(out_features, lora_rank, device=device, dtype=dtype), requires_grad=False)
            self.reset_parameters()

    def is_lora(self):
        return hasattr(self, "lora_A")

    def reset_parameters(self):
        nn.Linear.reset_parameters(self)
        if self.is_lora():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.is_lora() and not self.has_weights_merged:
            # (x A^T) B^T keeps the intermediate at rank r; B A is never formed
            out = out + self.lora_scaling * (self.lora_dropout(x) @ self.lora_A.T @ self.lora_B.T)
        return out

    def _update(self):
        return self.lora_scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def _merge(self):
        # W + s B A - s B A need not round back to W, so de-merging restores this exact copy
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(self.weight.float() + self._update())
        self.has_weights_merged = True

    @torch.no_grad()
    def _demerge(self):
        unmerged = self.__dict__.pop("_unmerged_weight", None)
        if unmerged is None:  # has_weights_merged set without _merge's copy: subtract the update
            unmerged = self.weight.float() - self._update()
        self.weight.copy_(unmerged)
        self.has_weights_merged = False

    def train(self, mode=True):
        """mode=True de-merges the LoRA update from the weight, mode=False (and so eval()) merges it."""
        super().train(mode)
        if self.is_lora() and mode and self.has_weights_merged:
            self._demerge()
        elif self.is_lora() and not mode and not self.has_weights_merged:
            self._merge()
        return self

    def extra_repr(self):
        if not self.is_lora():
            return super().extra_repr()
        rank = self.lora_A.shape[0]
        return (f"{super().extra_repr()}, lora_rank={rank}, lora_alpha={self.lora_scaling * rank:g}, "
                f"lora_scaling={self.lora_scaling:g}, lora_dropout={self.lora_dropout.p:g}")


def mark_only_lora_as_trainable(model):
    """Freeze every parameter of model except the LoRA matrices (lora_A, lora_B); returns model."""
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    return model


def lora_state_dict(model):
    """The LoRA matrices of model by name: all that a LoRA fine-tune changes, so all that its
    checkpoint needs beside the pretrained weights (merging changes W, never A or B)."""
    return {name: t for name, t in model.state_dict().items() if "lora_" in name}
