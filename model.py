"""GPT-2 written from scratch (nanoGPT-style), with LoRA on the query, key and value projections.

Loads Hugging Face GPT-2 weights (hub names or local directories) and computes the same logits.
The tokens every row of a batch starts with (the instruction) are computed once for the batch.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    method: str = "lora"  # what trains: lora (lora_rank 0: full fine-tuning), bitfit, adapter or prefix
    adapter_size: int = 0  # bottleneck adapters of this size after each sublayer (0: none)
    prefix_length: int = 0  # trained keys and values before every layer's sequence (0: none)


class KVCache:
    """Keys and values (B, n_head, past, head size) of every layer for the tokens processed so far; a start
    every row shares is kept once, as a batch of one (shared), never copied for each row."""

    def __init__(self, n_layer):
        self.layers, self.shared = [None] * n_layer, [None] * n_layer

    def __len__(self):
        """Tokens cached, the shared start's and the rows' own: layer 0's keys count them."""
        return sum(layers[0][0].size(2) for layers in (self.shared, self.layers) if layers[0] is not None)

    def share(self):
        """What has been computed so far (a batch of one) joins the start every row attends to."""
        self.shared = [kv if start is None else tuple(torch.cat(pair, dim=2) for pair in zip(start, kv))
                       for start, kv in zip(self.shared, self.layers)]
        self.layers = [None] * len(self.layers)

    def fork(self):
        """A new cache that holds the same shared start (not copied) and nothing else."""
        cache = KVCache(len(self.layers))
        cache.shared = self.shared
        return cache

    def extend(self, layer, k, v):
        if self.layers[layer] is not None:
            k = torch.cat([self.layers[layer][0], k], dim=2)
            v = torch.cat([self.layers[layer][1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        lora = dict(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout)
        self.q_attn = LoRALinear(config.n_embd, config.n_embd, bias=config.bias, **lora)
        self.k_attn = LoRALinear(config.n_embd, config.n_embd, bias=config.bias, **lora)
        self.v_attn = LoRALinear(config.n_embd, config.n_embd, bias=config.bias, **lora)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.prefix = None  # prefix tuning's trained keys and values (prefix.py adds them)

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        # query, key, value for all heads: (B, nh, T, hs)
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_attn, self.k_attn, self.v_attn))
        shared = None
        if kv_cache is not None:  # the earlier tokens' keys and values come first: (B, nh, past + T, hs)
            k, v = kv_cache.extend(layer, k, v)
            shared = kv_cache.shared[layer]
        # causal attention, or attn_mask (B or 1, 1, T, past + T) where there is padding or a past
        if shared is not None and not self.training:  # evaluation: the shared start is never copied
            y = attention_after_shared_start(q, k, v, shared, attn_mask[..., shared[0].size(2):])
        else:
            if shared is not None:  # training: copied to every row here, so that SDPA's backward saves little
                k, v = (torch.cat([s.expand(B, -1, -1, -1).to(own.dtype), own], dim=2)
                        for s, own in zip(shared, (k, v)))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               is_causal=attn_mask is None and T > 1,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


def attention_after_shared_start(q, k, v, shared, mask):
    """Causal attention of queries q (B, nh, T, hs) over a start every row shares (its keys and values
    (1, nh, S, hs), never copied per row) and then each row's own keys and values (B, nh, t, hs) where
    mask (B or 1, 1, T, t) allows: the rows' queries meet the start as one batch, one softmax spans both."""
    B, nh, T, hs = q.shape
    start_k, start_v = shared
    S = start_k.size(2)
    queries = q.transpose(0, 1).reshape(nh, B * T, hs)
    to_start = (queries @ start_k[0].transpose(1, 2)).view(nh, B, T, S).transpose(0, 1)
    to_own = (q @ k.transpose(2, 3)).float().masked_fill(~mask, float("-inf"))
    weights = torch.cat([to_start.float(), to_own], dim=3).div(math.sqrt(hs)).softmax(dim=3).to(v.dtype)
    from_start = weights[..., :S].transpose(0, 1).reshape(nh, B * T, S) @ start_v[0]
    return from_start.view(nh, B, T, hs).transpose(0, 1) + weights[..., S:] @ v


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        # bottleneck adapters on each sublayer's output, before the residual add (adapters.py adds them)
        self.adapter_attn, self.adapter_mlp = nn.Identity(), nn.Identity()

    def forward(self, x, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.adapter_attn(self.attn(self.ln_1(x), attn_mask, kv_cache, layer))
        return x + self.adapter_mlp(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    # what from_pretrained may set
    ADAPTABLE = ("dropout", "lora_rank", "lora_alpha", "lora_dropout", "method", "adapter_size",
                 "prefix_length")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, key_mask=None, kv_cache=None):
        """The last layer's output (B, T, n_embd) for tokens idx (B, T) after the past in kv_cache. key_mask
        (B, past + T) is False at left padding: positions count real tokens (and prefix tuning's vectors),
        nothing attends to padding."""
        B, T = idx.size()
        past = len(kv_cache) if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        if key_mask is None:
            key_mask = torch.ones(1, past + T, dtype=torch.bool, device=idx.device)
        pos = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]
        attn_mask = None if past == 0 and key_mask.all() else self._causal_mask(key_mask, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, kv_cache, layer)
        return self.transformer.ln_f(x)

    @property
    def context_length(self):
        """How many tokens of text fit: the positions that the prefixes (prefix tuning) leave."""
        return self.config.block_size - self.config.prefix_length

    def new_cache(self):
        """An empty KVCache; with prefix tuning, every layer's prefix is the start every row attends to."""
        kv_cache = KVCache(self.config.n_layer)
        if self.transformer.h[0].attn.prefix is not None:
            kv_cache.shared = [block.attn.prefix() for block in self.transformer.h]
        return kv_cache

    @staticmethod
    def _causal_mask(key_mask, T):
        """(B, 1, T, past + T): causal, padding hidden, each query sees itself (no empty softmax row)."""
        total = key_mask.size(1)
        causal = torch.ones(T, total, dtype=torch.bool, device=key_mask.device).tril(total - T)
        mask = causal & key_mask[:, None, None, :]
        mask[..., torch.arange(T), torch.arange(total - T, total)] = True
        return mask

    def _shared_start(self, start, kv_cache):
        """Run the tokens every row starts with (start, (1, n)) once, as a batch of one, into kv_cache,
        which then serves every row: autograd sums the rows' gradients through it, and in training the
        rows share its dropout masks. Returns its hidden states (1, n, n_embd)."""
        x = self.hidden_states(start, kv_cache=kv_cache)
        kv_cache.share()
        return x

    def forward(self, idx, targets=None, reduction="mean", n_shared=0):
        """idx (B, T) token ids. Without targets: (logits (B, T, vocab), None). With targets (B, T),
        -100 where there is none: (None, cross-entropy over the target positions), the vocabulary
        projection (the largest matmul) computed only there. The first n_shared tokens, the same in
        every row (the loader counts them), are computed once."""
        kv_cache = self.new_cache()
        start = self._shared_start(idx[:1, :n_shared], kv_cache) if n_shared else None
        x = self.hidden_states(idx[:, n_shared:], kv_cache=kv_cache)
        if n_shared:
            x = torch.cat([start.expand(len(idx), -1, -1), x], dim=1)
        if targets is None:
            return self.lm_head(x), None
        keep = targets != -100  # dataloader's IGNORE_INDEX, cross_entropy's default
        return None, F.cross_entropy(self.lm_head(x[keep]).float(), targets[keep], reduction=reduction)

    @torch.no_grad()
    def start_cache(self, start):
        """A KVCache of the tokens start (a list), computed once, for every row of many batches to share."""
        kv_cache = self.new_cache()
        if start:
            self._shared_start(torch.tensor([start], device=self.lm_head.weight.device), kv_cache)
        return kv_cache

    @torch.no_grad()
    def prefill(self, prompts, start=None):
        """Run token lists of different lengths as one left-padded batch after start, a start_cache of the
        tokens each begins with (or none). Returns the next-token logits (B, vocab) after each prompt, and
        the key_mask (False at padding) and kv_cache to go on from."""
        kv_cache = start.fork() if start is not None else self.new_cache()
        past = len(kv_cache)  # the prefixes (prefix tuning) and the shared start
        rows = [p[past - self.config.prefix_length:] for p in prompts]  # each without its cached start
        T = max(map(len, rows))
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        key_mask = torch.ones(len(rows), past + T, dtype=torch.bool)
        for row, p in enumerate(rows):  # [prefixes and the shared start | left padding | the rest]
            idx[row, T - len(p):] = torch.tensor(p, dtype=torch.long)
            key_mask[row, past:past + T - len(p)] = False
        idx, key_mask = idx.to(self.lm_head.weight.device), key_mask.to(self.lm_head.weight.device)
        return self.lm_head(self.hidden_states(idx, key_mask, kv_cache)[:, -1, :]), key_mask, kv_cache

    @torch.no_grad()
    def generate_batch(self, prompts, max_new_tokens, temperature=0.0, top_k=None, stop_tokens=(),
                       start=None):
        """The new tokens after each token list in prompts (after start, a start_cache of the tokens each
        begins with): greedy (temperature 0) or sampled from the top_k likeliest, a row ending after a stop
        token."""
        logits, key_mask, kv_cache = self.prefill(prompts, start)
        stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=logits.device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            if temperature == 0:
                idx = logits.argmax(dim=-1, keepdim=True)
            else:  # in float32, from the largest logit down: a tiny temperature gives -inf, never nan
                logits = (logits.float() - logits.float().max(dim=-1, keepdim=True).values) / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            new_tokens.append(torch.where(done[:, None], -1, idx))
            done |= torch.isin(idx[:, 0], stop)
            if done.all() or len(new_tokens) == max_new_tokens:
                break
            key_mask = torch.cat([key_mask, torch.ones_like(idx, dtype=torch.bool)], dim=1)
            logits = self.lm_head(self.hidden_states(idx, key_mask, kv_cache)[:, -1, :])
        return [[t for t in row if t != -1] for row in torch.cat(new_tokens, dim=1).tolist()]

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """GPT-2 from a hub id (gpt2, gpt2-medium, ...) or a local Hugging Face directory."""
        from transformers import GPT2LMHeadModel  # only this path needs transformers
        from transformers.utils.logging import disable_progress_bar
        disable_progress_bar()  # a bar per load would bury our own output
        override_args = override_args or {}
        assert set(override_args) <= set(cls.ADAPTABLE), override_args
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                           n_head=c.n_head, n_embd=c.n_embd, bias=True, **override_args)
        model = cls.uninitialized(config)
        for module in model.modules():  # LoRA's own initialisation; the base weights are loaded next
            if isinstance(module, LoRALinear) and module.is_lora():
                module.reset_parameters()
        model.load_hf_state_dict(hf.state_dict())
        return model

    @classmethod
    def uninitialized(cls, config):
        """A model to load weights into, allocated without the random init (seconds for gpt2-medium)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.transformer.wte.weight = model.lm_head.weight  # to_empty unties them
        return model

    @torch.no_grad()
    def load_hf_state_dict(self, hf_sd):
        """Copy a Hugging Face GPT2LMHeadModel state dict: Conv1D weights are stored (in, out), so
        they are transposed, and the fused c_attn is split into q, k and v."""
        sd = {}
        for key, value in hf_sd.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers of old checkpoints
            if ".c_attn." in key:
                prefix, kind = key.rsplit(".c_attn.", 1)
                parts = (value.t() if kind == "weight" else value).split(self.config.n_embd, dim=0)
                sd.update({f"{prefix}.{p}_attn.{kind}": part for p, part in zip("qkv", parts)})
            else:
                sd[key] = value.t() if key.endswith(("c_fc.weight", "c_proj.weight")) else value
        missing = [k for k in self.load_state_dict(sd, strict=False).missing_keys if "lora_" not in k]
        if missing:
            raise ValueError(f"GPT-2 checkpoint lacks {missing[:3]} ({len(missing)} tensors)")


def count_parameters(model):  # (trainable, total); the tied embedding counts once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
