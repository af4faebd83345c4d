import math

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear, mark_only_lora_as_trainable

LORA_ATTRS = ("lora_A", "lora_B", "lora_scaling", "lora_dropout")


def test_rank_zero_is_exactly_nn_linear():
    torch.manual_seed(3)
    ref = nn.Linear(20, 12)
    torch.manual_seed(3)
    layer = LoRALinear(20, 12, lora_rank=0, lora_alpha=8.0)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    x = torch.randn(4, 20)
    assert torch.equal(layer(x), ref(x))
    assert not layer.is_lora()
    for name in LORA_ATTRS:
        assert not hasattr(layer, name)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias"]


def test_construction_shapes_and_flags():
    layer = LoRALinear(20, 12, lora_rank=4, lora_alpha=10.0, lora_dropout=0.25)
    assert layer.is_lora() and layer.has_weights_merged is False
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4)
    assert layer.lora_scaling == 2.5
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.25
    assert not layer.lora_A.requires_grad and not layer.lora_B.requires_grad
    assert ("lora_rank=4" in repr(layer) and "lora_alpha=10" in repr(layer)
            and "lora_dropout=0.25" in repr(layer))


def test_seeded_draws_follow_the_documented_order():
    torch.manual_seed(1234)
    layer = LoRALinear(20, 12, bias=True, lora_rank=4, lora_alpha=8.0)

    # nn.Linear's own init, then reset_parameters() once more: weight, bias, A; B is zero
    torch.manual_seed(1234)
    bound = 1 / math.sqrt(20)
    for _ in range(2):
        weight = nn.init.kaiming_uniform_(torch.empty(12, 20), a=math.sqrt(5))
        bias = torch.empty(12).uniform_(-bound, bound)
    lora_A = nn.init.kaiming_uniform_(torch.empty(4, 20), a=math.sqrt(5))

    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.bias, bias)
    assert torch.equal(layer.lora_A, lora_A)
    assert torch.equal(layer.lora_B, torch.zeros(12, 4))


def random_lora_layer(rank=4, alpha=8.0, bias=True, dropout=0.0):
    layer = LoRALinear(16, 24, bias=bias, lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_forward_formula(bias):
    layer = random_lora_layer(bias=bias)
    x = torch.randn(3, 5, 16)
    expected = x @ layer.weight.T + layer.lora_scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
    if bias:
        expected = expected + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_B_gives_the_base_layer():
    layer = LoRALinear(16, 24, lora_rank=4, lora_alpha=8.0)
    x = torch.randn(7, 16)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_dropout_applies_only_to_the_lora_input():
    layer = random_lora_layer(dropout=0.5)
    x = torch.randn(64, 16)
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = (nn.functional.linear(x, layer.weight, layer.bias)
                + layer.lora_scaling * (dropped @ layer.lora_A.T @ layer.lora_B.T))
    torch.testing.assert_close(out, expected)


def test_eval_merges_and_train_demerges():
    layer = random_lora_layer(dropout=0.1)
    base = layer.weight.detach().clone()
    x = torch.randn(5, 16)
    layer.lora_dropout.eval()
    unmerged = layer(x)
    layer.lora_dropout.train()

    assert layer.eval() is layer
    assert layer.has_weights_merged and not layer.training and not layer.lora_dropout.training
    merged_weight = base + layer.lora_scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(layer.weight, merged_weight)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    layer.eval()  # a second eval() must not merge twice
    torch.testing.assert_close(layer.weight, merged_weight)

    assert layer.train() is layer
    assert not layer.has_weights_merged and layer.training
    assert torch.equal(layer.weight, base)  # exactly: W + s B A - s B A would only round back near W
    layer.train()
    assert torch.equal(layer.weight, base)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_demerge_of_a_weight_merged_by_hand_subtracts_the_update():
    layer = random_lora_layer()
    base = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight += layer.lora_scaling * layer.lora_B @ layer.lora_A
    layer.has_weights_merged = True
    layer.train()
    assert not layer.has_weights_merged
    torch.testing.assert_close(layer.weight, base, rtol=0, atol=1e-6)


def test_hundred_merge_cycles_keep_the_base_weight():
    layer = random_lora_layer()
    base = layer.weight.detach().clone()
    for _ in range(100):
        layer.eval()
        layer.train()
    assert torch.equal(layer.weight, base)


def test_merge_keeps_bfloat16_weights_in_their_dtype():
    layer = random_lora_layer().to(torch.bfloat16)
    layer.eval()
    assert layer.weight.dtype == torch.bfloat16 and layer.has_weights_merged


def test_mark_only_lora_as_trainable_and_gradients():
    model = nn.Sequential(random_lora_layer(), nn.Linear(24, 16), random_lora_layer(rank=2))
    for param in model.parameters():
        param.requires_grad = True
    assert mark_only_lora_as_trainable(model) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    model(torch.randn(4, 16)).sum().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
        if param.grad is not None:
            assert param.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora_rank=-1), "lora_rank must be >= 0, got -1"),
    (dict(lora_rank=4, lora_dropout=1.0), "lora_dropout must be in [0, 1), got 1.0"),
    (dict(lora_rank=4, lora_dropout=-0.1), "lora_dropout must be in [0, 1), got -0.1"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as e:
        LoRALinear(4, 4, **kwargs)
    assert str(e.value) == message
