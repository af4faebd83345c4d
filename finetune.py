"""The ways to fine-tune a GPT, one seam for the scripts: what each method adds to the model, and what
it trains.

lora (lora.py; its layers are the model's q, k, v), full fine-tuning (lora at lora_rank 0), bitfit
(bitfit.py), adapter (adapters.py) and prefix (prefix.py); model.config names the method and its sizes.
"""
from adapters import add_adapters, mark_only_adapters_as_trainable
from bitfit import mark_only_biases_as_trainable
from lora import mark_only_lora_as_trainable
from prefix import add_prefixes, mark_only_prefix_as_trainable

METHOD_SETTINGS = {"lora": {"lora_rank", "lora_alpha", "lora_dropout"}, "bitfit": set(),
                   "adapter": {"adapter_size"}, "prefix": {"prefix_length"}}  # each method's own flags
MARK_ONLY = dict(bitfit=mark_only_biases_as_trainable, adapter=mark_only_adapters_as_trainable,
                 prefix=mark_only_prefix_as_trainable)


def other_methods_settings(method):
    """The flags of the methods other than method, which a run of it does not use."""
    return set().union(*METHOD_SETTINGS.values()) - METHOD_SETTINGS[method]


def apply_method(model):
    """model with the layers its config's method adds (adapters, prefixes: fresh, once) and only what the
    method trains marked trainable (LoRA: A and B, at lora_rank 0 every weight); returns model."""
    if model.config.adapter_size:
        add_adapters(model, model.config.adapter_size)
    if model.config.prefix_length:
        add_prefixes(model, model.config.prefix_length)
    if model.config.method in MARK_ONLY:
        return MARK_ONLY[model.config.method](model)
    if model.config.lora_rank > 0:
        return mark_only_lora_as_trainable(model)
    for param in model.parameters():
        param.requires_grad = True
    return model
