"""Multi-branch LoRA layers, per-task norms, qkv splitting/injection and the continual classifier."""
import copy

import pytest
import timm
import torch
from timm.layers import Conv2dSame
from torch import nn

from cldist.models.continual import ContinualClassifier
from cldist.models.inject import SplitQKV, inject_lora, lora_layers, split_fused_qkv
from cldist.models.lora import (LoRAConv2d, LoRALayer, LoRALinear, TaskBatchNorm2d,
                                set_active_adapters)

ATOL = 1e-5


# -- layer factories: (base layer, input) --------------------------------------------------------
def _linear():
    return nn.Linear(12, 7), torch.randn(4, 12)


def _linear_nobias():
    return nn.Linear(12, 7, bias=False), torch.randn(2, 3, 12)  # extra leading dim


def _conv():
    return nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 8, 8)


def _conv_strided_reflect():
    return nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"), torch.randn(2, 4, 9, 9)


def _conv_grouped():
    return nn.Conv2d(4, 6, 3, padding=1, groups=2), torch.randn(2, 4, 8, 8)


def _conv_depthwise():
    return nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False), torch.randn(2, 5, 8, 8)


def _conv_same():
    # odd input, stride 2: TF-'same' pads asymmetrically, dynamically from the input size
    return Conv2dSame(4, 6, 3, stride=2), torch.randn(2, 4, 9, 9)


def _conv_same_depthwise():
    return Conv2dSame(6, 6, 5, stride=2, groups=6), torch.randn(2, 6, 11, 11)


LAYERS = [
    pytest.param(_linear, id="linear"),
    pytest.param(_linear_nobias, id="linear-nobias-3d"),
    pytest.param(_conv, id="conv"),
    pytest.param(_conv_strided_reflect, id="conv-stride2-reflect"),
    pytest.param(_conv_grouped, id="conv-groups2"),
    pytest.param(_conv_depthwise, id="conv-depthwise"),
    pytest.param(_conv_same, id="conv2dsame"),
    pytest.param(_conv_same_depthwise, id="conv2dsame-depthwise"),
]


def _wrap(base):
    return LoRALinear(base) if isinstance(base, nn.Linear) else LoRAConv2d(base)


def _plain_with_weight(base, weight):
    """A copy of the un-wrapped base layer whose weight is `weight`."""
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain.weight.copy_(weight)
    return plain


def _set_random(layer: LoRALayer, name: str, rank: int, scaling: float = 1.0):
    layer.add_adapter(name, rank, scaling=scaling)
    B = torch.randn(layer.out_features, rank)
    A = torch.randn(rank, layer.in_features)
    layer.set_adapter_weights(name, B, A)
    return B, A


@pytest.mark.parametrize("factory", LAYERS)
def test_unmerged_equals_plain_layer_with_merged_weight(factory):
    torch.manual_seed(0)
    base, x = factory()
    plain_base = copy.deepcopy(base)
    layer = _wrap(base)
    B, A = _set_random(layer, "t000", rank=2, scaling=0.5)
    layer.active = ("t000",)
    W = plain_base.weight.detach()
    merged_w = W + 0.5 * (B @ A).reshape(W.shape)
    expected = _plain_with_weight(plain_base, merged_w)(x)
    out = layer(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    # the delta must not be negligible, or the comparison above proves nothing
    assert (out - plain_base(x)).abs().max() > 1e-2


@pytest.mark.parametrize("factory", LAYERS)
def test_merge_then_forward_without_adapters(factory):
    torch.manual_seed(1)
    base, x = factory()
    layer = _wrap(base)
    _set_random(layer, "t000", rank=2, scaling=0.5)
    layer.active = ("t000",)
    before = layer(x).detach()
    layer.merge(["t000"])
    assert layer.adapters() == []
    assert layer.active == ()
    assert "t000" not in layer.scaling
    torch.testing.assert_close(layer(x), before, atol=ATOL, rtol=0)
    # the base layer itself (no wrapper) now holds the merged weight
    torch.testing.assert_close(layer.base(x), before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("factory", LAYERS)
def test_several_active_adapters_sum(factory):
    torch.manual_seed(2)
    base, x = factory()
    plain_base = copy.deepcopy(base)
    layer = _wrap(base)
    B0, A0 = _set_random(layer, "t000", rank=1, scaling=1.0)
    B1, A1 = _set_random(layer, "t001", rank=2, scaling=0.25)
    B2, A2 = _set_random(layer, "t002", rank=1, scaling=2.0)  # present but inactive
    W = plain_base.weight.detach()
    y_base = plain_base(x)

    layer.active = ("t000", "t001")
    both = layer(x)
    merged = W + (B0 @ A0 + 0.25 * (B1 @ A1)).reshape(W.shape)
    torch.testing.assert_close(both, _plain_with_weight(plain_base, merged)(x), atol=ATOL, rtol=0)

    # each delta on its own, summed, gives the same output (the conv is linear in its weight)
    layer.active = ("t000",)
    d0 = layer(x) - y_base
    layer.active = ("t001",)
    d1 = layer(x) - y_base
    torch.testing.assert_close(both, y_base + d0 + d1, atol=ATOL, rtol=0)

    # delta_weight is the same sum, shaped like the base weight
    dw = layer.delta_weight(["t000", "t001"])
    assert dw.shape == W.shape
    torch.testing.assert_close(dw, merged - W, atol=ATOL, rtol=0)

    # an active name the layer does not own is ignored
    layer.active = ("t000", "t001", "t999")
    torch.testing.assert_close(layer(x), both, atol=ATOL, rtol=0)


@pytest.mark.parametrize("factory", LAYERS)
def test_fresh_adapter_is_bit_identical_to_base(factory):
    torch.manual_seed(3)
    base, x = factory()
    plain_base = copy.deepcopy(base)
    layer = _wrap(base)
    layer.add_adapter("t000", rank=2)
    assert torch.count_nonzero(layer.lora_A["t000"]) > 0  # A random, B zero
    assert torch.count_nonzero(layer.lora_B["t000"]) == 0
    layer.active = ("t000",)
    assert torch.equal(layer(x), plain_base(x))
    layer.active = ()
    assert torch.equal(layer(x), plain_base(x))


@pytest.mark.parametrize("factory, flat", [
    pytest.param(_linear, (7, 12), id="linear"),
    pytest.param(_conv, (6, 36), id="conv"),
    pytest.param(_conv_grouped, (6, 18), id="conv-groups2"),
    pytest.param(_conv_depthwise, (5, 9), id="conv-depthwise"),
    pytest.param(_conv_same, (6, 36), id="conv2dsame"),
])
def test_adapter_shapes_and_rank_bounds(factory, flat):
    torch.manual_seed(4)
    base, _ = factory()
    layer = _wrap(base)
    assert (layer.out_features, layer.in_features) == flat
    assert layer.max_rank() == min(flat)
    layer.add_adapter("full", rank=min(flat))
    assert layer.lora_A["full"].shape == (min(flat), flat[1])
    assert layer.lora_B["full"].shape == (flat[0], min(flat))
    assert layer.rank("full") == min(flat)
    with pytest.raises(ValueError, match="rank"):
        layer.add_adapter("too_big", rank=min(flat) + 1)
    with pytest.raises(ValueError, match="rank"):
        layer.add_adapter("zero", rank=0)
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("full", rank=1)


def test_only_current_task_gets_gradients():
    torch.manual_seed(5)
    layer = LoRALinear(nn.Linear(10, 6))
    for p in layer.base.parameters():
        p.requires_grad_(False)
    _set_random(layer, "t000", rank=2)
    _set_random(layer, "t001", rank=3)
    layer.lora_A["t000"].requires_grad_(False)
    layer.lora_B["t000"].requires_grad_(False)
    layer.active = ("t000", "t001")
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters()
              if "t001" not in n}
    assert set(frozen) == {"base.weight", "base.bias", "lora_A.t000", "lora_B.t000"}

    # every parameter goes to the optimiser: the frozen ones must still not move
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    layer(torch.randn(8, 10)).pow(2).sum().backward()
    assert layer.lora_A["t001"].grad is not None and layer.lora_A["t001"].grad.abs().sum() > 0
    assert layer.lora_B["t001"].grad is not None and layer.lora_B["t001"].grad.abs().sum() > 0
    assert layer.lora_A["t000"].grad is None
    assert layer.lora_B["t000"].grad is None
    assert layer.base.weight.grad is None
    assert layer.base.bias.grad is None
    A1_before = layer.lora_A["t001"].detach().clone()
    opt.step()
    params = dict(layer.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    assert not torch.equal(layer.lora_A["t001"], A1_before)


def test_only_current_task_gets_gradients_conv():
    torch.manual_seed(6)
    layer = LoRAConv2d(Conv2dSame(3, 4, 3, stride=2))
    for p in layer.base.parameters():
        p.requires_grad_(False)
    _set_random(layer, "t000", rank=2)
    _set_random(layer, "t001", rank=2)
    for p in (layer.lora_A["t000"], layer.lora_B["t000"]):
        p.requires_grad_(False)
    layer.active = ("t000", "t001")
    frozen = {n: p.detach().clone() for n, p in layer.named_parameters() if "t001" not in n}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    layer(torch.randn(2, 3, 7, 7)).pow(2).sum().backward()
    assert layer.lora_A["t001"].grad is not None and layer.lora_B["t001"].grad is not None
    assert layer.lora_A["t000"].grad is None and layer.lora_B["t000"].grad is None
    assert layer.base.weight.grad is None
    opt.step()
    params = dict(layer.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n


def test_remove_adapter_and_delta_matrix():
    torch.manual_seed(7)
    layer = LoRALinear(nn.Linear(5, 4))
    B, A = _set_random(layer, "t000", rank=2, scaling=3.0)
    _set_random(layer, "t001", rank=1)
    torch.testing.assert_close(layer.delta_matrix("t000"), 3.0 * B @ A)
    layer.active = ("t000", "t001")
    layer.remove_adapter("t000")
    assert layer.adapters() == ["t001"]
    assert layer.active == ("t001",)
    assert "t000" not in layer.scaling


def test_add_adapter_init_modes():
    layer = LoRALinear(nn.Linear(16, 4))
    g = torch.Generator().manual_seed(0)
    layer.add_adapter("k", 2, generator=g)
    A = layer.lora_A["k"]
    assert A.abs().max() <= 1.0 / 16 ** 0.5
    g2 = torch.Generator().manual_seed(0)
    layer.add_adapter("k2", 2, generator=g2)
    assert torch.equal(layer.lora_A["k2"], A)  # reproducible from the generator
    layer.add_adapter("z", 2, init_A="zero")
    assert torch.count_nonzero(layer.lora_A["z"]) == 0
    with pytest.raises(ValueError, match="init_A"):
        layer.add_adapter("bad", 2, init_A="gaussian")


# -- TaskBatchNorm2d ---------------------------------------------------------------------------
def _trained_bn(c=3):
    torch.manual_seed(8)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    return bn


def test_task_batchnorm_branch_copies_base():
    bn = _trained_bn()
    for p in bn.parameters():
        p.requires_grad_(False)
    tbn = TaskBatchNorm2d(bn)
    tbn.add_adapter("t000")
    assert tbn.adapters() == ["t000"]
    branch = tbn.branches["t000"]
    assert branch is not bn
    base_sd, branch_sd = bn.state_dict(), branch.state_dict()
    assert set(base_sd) == set(branch_sd)
    for k in base_sd:
        assert torch.equal(base_sd[k], branch_sd[k]), k
        assert branch_sd[k].data_ptr() != base_sd[k].data_ptr(), k  # a copy, not shared
    assert all(p.requires_grad for p in branch.parameters())
    assert not any(p.requires_grad for p in bn.parameters())

    x = torch.randn(2, 3, 4, 4)
    tbn.eval()
    tbn.active = ("t000",)
    assert torch.equal(tbn(x), bn(x))
    # the branch is its own: changing it changes the output, not the base
    with torch.no_grad():
        branch.bias.add_(1.0)
    assert not torch.equal(tbn(x), bn(x))
    tbn.active = ()
    assert torch.equal(tbn(x), bn(x))


def test_task_batchnorm_activation_rules():
    bn = _trained_bn()
    tbn = TaskBatchNorm2d(bn)
    tbn.add_adapter("t000")
    tbn.add_adapter("t001")
    with torch.no_grad():
        tbn.branches["t000"].bias.add_(1.0)
        tbn.branches["t001"].bias.add_(-2.0)
    tbn.eval()
    x = torch.randn(2, 3, 4, 4)
    tbn.active = ("t000", "t001")
    with pytest.raises(RuntimeError, match="at most one"):
        tbn(x)
    tbn.active = ()
    assert torch.equal(tbn(x), bn(x))
    tbn.active = ("t999",)  # not owned -> base
    assert torch.equal(tbn(x), bn(x))
    tbn.active = ("t001", "t999")  # one owned -> that branch
    assert torch.equal(tbn(x), tbn.branches["t001"](x))
    assert not torch.equal(tbn(x), bn(x))


def test_set_active_adapters_reaches_every_layer():
    model = nn.Sequential(LoRALinear(nn.Linear(3, 3)), nn.ReLU(),
                          nn.Sequential(LoRAConv2d(nn.Conv2d(3, 3, 1)),
                                        TaskBatchNorm2d(nn.BatchNorm2d(3))))
    set_active_adapters(model, ["t000", "t001"])
    assert model[0].active == ("t000", "t001")
    assert model[2][0].active == ("t000", "t001")
    assert model[2][1].active == ("t000", "t001")
    set_active_adapters(model, [])
    assert model[0].active == () and model[2][1].active == ()


# -- qkv splitting and injection ----------------------------------------------------------------
def _test_vit():
    torch.manual_seed(9)
    model = timm.create_model("test_vit", num_classes=0, img_size=16, patch_size=4)
    return model.eval()


def test_split_fused_qkv_keeps_outputs():
    model = _test_vit()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    n_blocks = len(model.blocks)
    assert split_fused_qkv(model) == n_blocks
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    for i in range(n_blocks):
        qkv = model.get_submodule(f"blocks.{i}.attn.qkv")
        assert isinstance(qkv, SplitQKV)
        for part in ("q", "k", "v"):
            lin = model.get_submodule(f"blocks.{i}.attn.qkv.{part}")
            assert type(lin) is nn.Linear
            assert (lin.in_features, lin.out_features) == (64, 64)
    # nothing fused is left: a second call splits nothing
    assert split_fused_qkv(model) == 0


def test_inject_lora_on_split_k_projections():
    model = _test_vit()
    split_fused_qkv(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    names = inject_lora(model, ["blocks.*.attn.qkv.k"])
    assert names == [f"blocks.{i}.attn.qkv.k" for i in range(len(model.blocks))]
    layers = lora_layers(model)
    assert list(layers) == names
    assert all(isinstance(m, LoRALinear) for m in layers.values())
    # q and v are untouched
    assert type(model.get_submodule("blocks.0.attn.qkv.q")) is nn.Linear
    # wrapping alone, and a fresh adapter, change nothing
    for layer in layers.values():
        layer.add_adapter("t000", rank=4)
    set_active_adapters(model, ["t000"])
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_inject_lora_mixed_patterns_and_conv():
    model = _test_vit()
    names = inject_lora(model, ["patch_embed.proj", "blocks.[0-1].mlp.fc1"])
    assert names == ["patch_embed.proj", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert isinstance(model.patch_embed.proj, LoRAConv2d)
    assert isinstance(model.blocks[1].mlp.fc1, LoRALinear)
    assert type(model.blocks[2].mlp.fc1) is nn.Linear


def test_inject_lora_no_match_raises_with_pattern_and_candidates():
    model = _test_vit()
    pattern = "blocks.*.attn.nonexistent"
    with pytest.raises(ValueError) as info:
        inject_lora(model, [pattern])
    msg = str(info.value)
    assert pattern in msg
    assert "blocks.0.attn.qkv" in msg
    assert "patch_embed.proj" in msg
    # nothing was wrapped
    assert lora_layers(model) == {}


# -- ContinualClassifier ------------------------------------------------------------------------
def test_continual_classifier_heads():
    torch.manual_seed(10)
    backbone = nn.Sequential(nn.Flatten(), LoRALinear(nn.Linear(12, 8)))
    model = ContinualClassifier(backbone, feature_dim=8)
    g = torch.Generator().manual_seed(0)
    h0 = model.add_head("t000", 3, g)
    h1 = model.add_head("t001", 5, g)
    x = torch.randn(4, 3, 2, 2)

    model.activate([], ["t000", "t001"])
    logits = model(x)
    assert logits.shape == (4, 8)
    f = model.features(x)
    assert f.shape == (4, 8)
    torch.testing.assert_close(logits, torch.cat([h0(f), h1(f)], dim=-1))

    # order follows the activation order; one head alone gives its width
    model.activate([], ["t001", "t000"])
    torch.testing.assert_close(model(x), torch.cat([h1(f), h0(f)], dim=-1))
    model.activate([], ["t001"])
    assert model(x).shape == (4, 5)

    with pytest.raises(KeyError, match="t002"):
        model.activate([], ["t000", "t002"])
    assert list(model.lora_layers()) == ["1"]


def test_continual_classifier_activates_adapters():
    torch.manual_seed(11)
    backbone = nn.Sequential(LoRALinear(nn.Linear(6, 4)))
    model = ContinualClassifier(backbone, feature_dim=4)
    model.add_head("t000", 2)
    _set_random(backbone[0], "t000", rank=2)
    x = torch.randn(3, 6)
    model.activate([], ["t000"])
    plain = model(x)
    model.activate(["t000"], ["t000"])
    assert backbone[0].active == ("t000",)
    assert not torch.allclose(model(x), plain)


# -- batched branches (lora.BATCH_BRANCHES) equal the per-branch loop ------------------------------
from cldist.models import lora  # noqa: E402


class _Coef:
    """c = alpha * k (+ a constant): a coefficient with a trainable factor, as SD-LoRA's."""

    def __init__(self, alpha, k, plain=False):
        self.alpha, self.k, self.plain = alpha, k, plain

    def __call__(self):
        return float(self.k) if self.plain else self.alpha * self.k + 0.1


def _mixed_layer(factory, seed=11, train_base=False):
    """A layer with every kind of branch: frozen plain (one gated), frozen with coefficients
    (one a plain float), trainable, and trainable with a trainable gate and a coefficient."""
    torch.manual_seed(seed)
    base, x = factory()
    layer = _wrap(base)
    for p in layer.base.parameters():
        p.requires_grad_(train_base)
    alpha = nn.Parameter(torch.tensor([0.7]))
    specs = [("f0", 1, 1.0), ("f1", 2, 0.5), ("f2", 1, 2.0), ("c0", 2, 1.0), ("c1", 1, 0.3),
             ("c2", 1, 1.0), ("t0", 2, 0.5), ("t1", 1, 1.0)]
    for name, rank, scaling in specs:
        _set_random(layer, name, rank, scaling)
    layer.add_gate("f2")
    layer.add_gate("t1")
    for name, k in (("c0", 1.5), ("c1", -2.0), ("t1", 0.5)):
        layer.set_coefficient(name, _Coef(alpha, k))
    layer.set_coefficient("c2", _Coef(alpha, 0.25, plain=True))
    for name in ("f0", "f1", "f2", "c0", "c1", "c2"):
        for d in (layer.lora_A, layer.lora_B, layer.lora_w):
            if name in d:
                d[name].requires_grad_(False)
    layer.active = tuple(name for name, _, _ in specs)
    return layer, x, alpha


def _out_and_grads(layer, x, extra=()):
    """(y, grads w.r.t. x and every trainable tensor) under the batched and the loop path."""
    wrt = [p for p in layer.parameters() if p.requires_grad] + list(extra)
    results = []
    for batched in (True, False):
        lora.BATCH_BRANCHES = batched
        try:
            xx = x.detach().clone().requires_grad_(True)
            y = layer(xx)
            weights = torch.linspace(-1.0, 2.0, y.numel()).reshape(y.shape)
            grads = torch.autograd.grad((y * weights).sum(), [xx] + wrt, allow_unused=True)
        finally:
            lora.BATCH_BRANCHES = True
        results.append((y.detach(), grads))
    return results


def _assert_batched_equals_loop(layer, x, extra=()):
    (y, grads), (y_loop, grads_loop) = _out_and_grads(layer, x, extra)
    torch.testing.assert_close(y, y_loop, atol=1e-4, rtol=1e-5)
    # the branches must matter, or the equality proves nothing
    assert (y_loop - layer.base(x)).abs().max() > 1e-2
    assert len(grads) == len(grads_loop)
    for g, g_loop in zip(grads, grads_loop):
        assert (g is None) == (g_loop is None)  # an inactive trainable tensor gets none
        if g is not None:
            torch.testing.assert_close(g, g_loop, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trained-base"])
@pytest.mark.parametrize("factory", LAYERS)
def test_batched_branches_equal_the_loop(factory, train_base):
    layer, x, alpha = _mixed_layer(factory, train_base=train_base)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # the batched path really ran: both groups were concatenated
    fold, coef = layer._fold_cache, layer._coef_cache
    assert fold is not None and [k[0] for k in fold[0][0]] == ["f0", "f1", "f2"]
    assert coef is not None and [k[0] for k in coef[0][0]] == ["c0", "c1", "c2"]
    # nothing changed: the next forward reuses both caches
    layer(x)
    assert layer._fold_cache is fold and layer._coef_cache is coef


@pytest.mark.parametrize("tokens", [1, 64], ids=["factored", "dense"])
def test_batched_linear_coefficient_paths(tokens):
    """A Linear adds the coefficient group as B diag(m) (A x) for few tokens, folds it into the
    weight for many: both equal the loop."""
    layer, _, alpha = _mixed_layer(_linear)
    _assert_batched_equals_loop(layer, torch.randn(tokens, 12), extra=[alpha])


@pytest.mark.parametrize("factory", LAYERS)
def test_batched_cache_follows_every_change(factory):
    layer, x, alpha = _mixed_layer(factory)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # a coefficient's trainable scalar moves (an optimiser step)
    with torch.no_grad():
        alpha.mul_(-3.0)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # frozen weights replaced in place
    _set_random_weights = lambda n: layer.set_adapter_weights(  # noqa: E731
        n, torch.randn_like(layer.lora_B[n]), torch.randn_like(layer.lora_A[n]))
    _set_random_weights("f1")
    _set_random_weights("c0")
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    with torch.no_grad():
        layer.lora_w["f2"].mul_(3.0)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    layer.scaling["f0"] = 4.0
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # the active set changes
    layer.active = ("f2", "f0", "c1", "t0", "c0")
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    layer.active = ("f1", "f2", "c2", "t1", "c1", "f0", "c0")
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # a coefficient removed (the branch moves to the folded group) and added back
    layer.set_coefficient("c0", None)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    layer.set_coefficient("f1", _Coef(alpha, 3.0))
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # a gate added to a folded branch
    layer.add_gate("f0")
    layer.lora_w["f0"].requires_grad_(False)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # trainable flags change: the trained branch freezes, a frozen one trains
    for p in (layer.lora_A["t0"], layer.lora_B["t0"]):
        p.requires_grad_(False)
    layer.lora_B["f2"].requires_grad_(True)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # a branch removed, one re-created under the same name, two merged into the base weight
    layer.remove_adapter("c2")
    layer.remove_adapter("f1")
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    _set_random(layer, "f1", 2, 0.5)
    layer.lora_A["f1"].requires_grad_(False)
    layer.lora_B["f1"].requires_grad_(False)
    layer.active = layer.active + ("f1",)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    layer.merge(["f0", "f1"])
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # the base weight changes under an unchanged folded group (a merge of other branches)
    layer.active = ("c0", "t0", "t1", "c1")
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    assert [k[0] for k in layer._fold_cache[0][0]] == ["c0", "t0"]
    layer.merge(["c1"])
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    # the base weight starts training (its gradient must flow through the folded weight)
    layer.base.weight.requires_grad_(True)
    _assert_batched_equals_loop(layer, x, extra=[alpha])


def test_batched_after_training_steps_and_freeze():
    """The trained branch moves every step (loop path); once frozen it is folded with its
    trained values, not stale ones."""
    layer, x, alpha = _mixed_layer(_linear)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad] + [alpha], lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    for name in ("t0", "t1"):
        for d in (layer.lora_A, layer.lora_B, layer.lora_w):
            if name in d:
                d[name].requires_grad_(False)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    assert "t0" in [k[0] for k in layer._fold_cache[0][0]]


@pytest.mark.parametrize("factory", [_linear, _conv])
def test_batched_lone_branch_and_copies(factory):
    layer, x, alpha = _mixed_layer(factory)
    # one branch of a group runs as before: bit-identical to the loop
    layer.active = ("f0", "t0", "c0")
    (y, _), (y_loop, _) = _out_and_grads(layer, x, [alpha])
    assert torch.equal(y, y_loop)
    # a cache built in inference mode serves a training forward; a copy rebuilds its own
    layer.active = ("f0", "f1", "c0", "c1", "t0")
    with torch.inference_mode():
        layer(x)
    _assert_batched_equals_loop(layer, x, extra=[alpha])
    twin = copy.deepcopy(layer)
    assert twin._fold_cache is None and twin._coef_cache is None
    with torch.no_grad():
        twin.lora_A["f0"].mul_(2.0)
    assert not torch.allclose(twin(x), layer(x))
    _assert_batched_equals_loop(twin, x)


def test_batched_cache_is_full_precision_and_follows_dtype():
    """A cache first built under bf16 autocast holds float32 sums (the forward's autocast casts
    them, as it casts W); a dtype change (model.double()) rebuilds it."""
    layer, x, alpha = _mixed_layer(_linear)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    W = layer.base.weight
    fold = ["f0", "f1", "f2"]
    exact = W + sum(layer.delta_matrix(n) for n in fold)
    assert layer._fold_cache[2].dtype == torch.float32
    torch.testing.assert_close(layer._fold_cache[2], exact.detach(), atol=1e-6, rtol=1e-6)
    layer.double()
    alpha.data = alpha.data.double()  # the coefficients' scalar follows the model
    _assert_batched_equals_loop(layer, x.double(), extra=[alpha])
    assert layer._fold_cache[2].dtype == torch.float64


# -- vector coefficients (set_coefficients): one callable for many branches ------------------------
class _VecCoef:
    """c = alphas * k + 0.1 for many branches at once (SD-LoRA's magnitudes over norms); counts
    its calls."""

    def __init__(self, alphas, k):
        self.alphas, self.k, self.calls = alphas, torch.tensor(k), 0

    def __call__(self):
        self.calls += 1
        return self.alphas * self.k + 0.1


def _vector_layer(factory, seed=5):
    """Frozen branches v0..v3 (one gated) under ONE vector coefficient, a frozen branch with a
    per-branch callable beside them, a trainable branch inside the vector group and a plain
    trainable one. Returns (layer, x, alphas, fn, the same coefficients as per-branch callables)."""
    torch.manual_seed(seed)
    base, x = factory()
    layer = _wrap(base)
    layer.base.requires_grad_(False)
    specs = [("v0", 2, 1.0), ("s0", 1, 0.5), ("v1", 1, 0.5), ("v2", 3, 2.0), ("t0", 2, 1.0),
             ("v3", 1, 1.0), ("t1", 1, 0.5)]
    for name, rank, scaling in specs:
        _set_random(layer, name, rank, scaling)
    layer.add_gate("v2")
    for name in ("v0", "s0", "v1", "v2", "v3"):
        for d in (layer.lora_A, layer.lora_B, layer.lora_w):
            if name in d:
                d[name].requires_grad_(False)
    names = ["v0", "v1", "v2", "v3", "t1"]  # t1 trains: the loop path reads its entry
    alphas = nn.Parameter(torch.tensor([0.7, -1.2, 0.4, 2.0, 1.1]))
    k = [1.5, -2.0, 0.5, 1.0, 3.0]
    fn = _VecCoef(alphas, k)
    layer.set_coefficients(names, fn)
    alpha = nn.Parameter(torch.tensor([0.3]))
    layer.set_coefficient("s0", _Coef(alpha, 2.0))
    per_branch = {n: (lambda i=i: alphas[i] * k[i] + 0.1) for i, n in enumerate(names)}
    layer.active = tuple(name for name, _, _ in specs)
    return layer, x, (alphas, alpha), fn, per_branch


@pytest.mark.parametrize("factory", LAYERS)
def test_vector_coefficients_equal_the_loop_and_per_branch_callables(factory):
    layer, x, extra, fn, per_branch = _vector_layer(factory)
    # batched (one vector op) == the per-branch loop, outputs and gradients w.r.t. x, the
    # magnitudes and the trainable branches
    _assert_batched_equals_loop(layer, x, extra=extra)
    coef = layer._coef_cache
    assert [k[0] for k in coef[0][0]] == ["v0", "s0", "v1", "v2", "v3"]
    # one call of the vector callable per forward, batched and in the loop alike
    for batched in (True, False):
        lora.BATCH_BRANCHES = batched
        try:
            fn.calls = 0
            layer(x)
            assert fn.calls == 1
        finally:
            lora.BATCH_BRANCHES = True
    # the same coefficients given one callable per branch (the old form): the same outputs and
    # gradients, batched and looped
    twin = copy.deepcopy(layer)
    for n, c in per_branch.items():
        twin.set_coefficient(n, c)
    twin.set_coefficient("s0", layer.coefficients["s0"])  # the original alpha, not a copy
    (y, grads), (y_loop, grads_loop) = _out_and_grads(layer, x, extra)
    (y_old, grads_old), (y_old_loop, grads_old_loop) = _out_and_grads(twin, x, extra)
    # gradients w.r.t. x, the twin's own trainable branches (same order) and the magnitudes
    for new, old in ((y, y_old), (y_loop, y_old_loop), (grads, grads_old),
                     (grads_loop, grads_old_loop)):
        torch.testing.assert_close(new, old, atol=1e-5, rtol=1e-6)
    assert grads[-2].abs().min() > 0  # every magnitude gets a gradient
    # delta_matrix (merge, Conv2d loop) reads the vector too
    torch.testing.assert_close(layer.delta_matrix("v2"), twin.delta_matrix("v2"))


@pytest.mark.parametrize("factory", [_linear, _conv])
def test_vector_coefficient_cache_follows_the_branch_set(factory):
    layer, x, extra, fn, _ = _vector_layer(factory)
    alphas, alpha = extra
    _assert_batched_equals_loop(layer, x, extra=extra)
    first = layer._coef_cache
    layer(x)
    assert layer._coef_cache is first  # unchanged: reused
    # the magnitudes move (an optimiser step): same cache, new values
    with torch.no_grad():
        alphas.mul_(-2.0)
    _assert_batched_equals_loop(layer, x, extra=extra)
    assert layer._coef_cache is first
    # the active set changes: order, a branch of the group off, the single one off
    layer.active = ("v3", "t0", "v1", "v0", "t1")
    _assert_batched_equals_loop(layer, x, extra=extra)
    assert [k[0] for k in layer._coef_cache[0][0]] == ["v3", "v1", "v0"]
    layer.active = ("v0", "s0", "v1", "v2", "v3", "t0", "t1")
    _assert_batched_equals_loop(layer, x, extra=extra)
    # a new vector over a different set of names (a new group, other slots)
    k2 = [0.5, 2.0, -1.0]
    fn2 = _VecCoef(alphas[:3], k2)
    before = layer._coef_cache
    layer.set_coefficients(["v3", "s0", "v0"], fn2)
    _assert_batched_equals_loop(layer, x, extra=extra)
    assert layer._coef_cache is not before
    # one member replaced by a single callable, then the group's coefficients removed
    layer.set_coefficient("v1", _Coef(alpha, -0.5))
    _assert_batched_equals_loop(layer, x, extra=extra)
    layer.set_coefficients(["v3", "s0", "v0"], None)
    _assert_batched_equals_loop(layer, x, extra=extra)
    assert [k[0] for k in layer._fold_cache[0][0]] == ["v0", "s0", "v3"]
    # a branch of a group removed and re-created under the same name (frozen, no coefficient)
    layer.set_coefficients(["v0", "v1", "v2", "v3"], _VecCoef(alphas[:4], [1.0, 2.0, 3.0, 4.0]))
    _assert_batched_equals_loop(layer, x, extra=extra)
    layer.remove_adapter("v1")
    _assert_batched_equals_loop(layer, x, extra=extra)
    _set_random(layer, "v1", 2, 0.5)
    layer.lora_A["v1"].requires_grad_(False)
    layer.lora_B["v1"].requires_grad_(False)
    layer.active = layer.active + ("v1",)
    _assert_batched_equals_loop(layer, x, extra=extra)
    # frozen weights of a group member replaced in place
    layer.set_adapter_weights("v2", torch.randn_like(layer.lora_B["v2"]),
                              torch.randn_like(layer.lora_A["v2"]))
    _assert_batched_equals_loop(layer, x, extra=extra)


def test_vector_coefficient_checks_its_length():
    layer, x, extra, fn, _ = _vector_layer(_linear)
    layer.set_coefficients(["v0", "v1"], lambda: torch.ones(3))
    with pytest.raises(ValueError, match="2 branches has shape"):
        layer(x)
    with pytest.raises(ValueError, match="repeated"):
        layer.set_coefficients(["v0", "v0"], lambda: torch.ones(2))
