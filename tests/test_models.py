"""cnnkit.models: backbones with a new head, one architecture per head type, and their weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torchvision.models import get_model, get_model_weights

from cnnkit.errors import ConfigError, WeightsError
from cnnkit.models.build import (
    HeadSpec,
    build_head,
    build_model,
    head_module,
    hub_cache_path,
    list_archs,
    model_from_spec,
)

# One architecture per head type / family.
ARCHS = ["resnet18", "densenet121", "vgg11", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf"]
FULL_HEAD = [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.LogSoftmax]


@pytest.fixture(scope="module", params=ARCHS)
def frozen(request):
    """(arch, model, spec): built once per architecture, frozen, 3 classes, 16 hidden units."""
    torch.manual_seed(0)
    model, spec = build_model(request.param, 3, "none", hidden_units=16, dropout=0.3, freeze=True)
    return request.param, model.eval(), spec


def test_output_is_log_probabilities_for_each_class(frozen):
    _, model, _ = frozen
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3)
    assert torch.allclose(out.exp().sum(dim=1), torch.ones(2), atol=1e-5)
    assert (out <= 0).all()


def test_head_is_linear_relu_dropout_linear_logsoftmax(frozen):
    arch, model, spec = frozen
    head = head_module(model, arch)
    assert [type(m) for m in head] == FULL_HEAD
    assert head[0].in_features == spec.in_features and head[0].out_features == 16
    assert head[2].p == pytest.approx(0.3)
    assert head[3].out_features == 3
    assert spec == HeadSpec(spec.in_features, 3, 16, 0.3)


def test_freeze_leaves_only_the_head_trainable(frozen):
    arch, model, _ = frozen
    head_params = {id(p) for p in head_module(model, arch).parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head_params
    assert len(trainable) == 4  # two Linear layers: weight and bias each


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_hidden_units_gives_a_single_linear_layer(arch):
    model, spec = build_model(arch, 3, "none", hidden_units=0)
    head = head_module(model, arch)
    assert [type(m) for m in head] == [nn.Linear, nn.LogSoftmax]
    assert head[0].in_features == spec.in_features and head[0].out_features == 3


def test_convnext_keeps_its_norm_and_flatten_before_the_new_head():
    model, _ = build_model("convnext_tiny", 3, "none", hidden_units=0)
    assert type(model.classifier[0]).__name__ == "LayerNorm2d"
    assert isinstance(model.classifier[1], nn.Flatten)
    assert model.classifier[2] is head_module(model, "convnext_tiny")


def test_without_freeze_every_parameter_is_trainable():
    model, _ = build_model("mobilenet_v3_small", 4, "none", hidden_units=8)
    assert all(p.requires_grad for p in model.parameters())


def test_model_from_spec_rebuilds_the_same_shapes():
    model, spec = build_model("mobilenet_v3_small", 5, "none", hidden_units=8, dropout=0.1)
    rebuilt = model_from_spec("mobilenet_v3_small", spec)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_build_head_shapes():
    head = build_head(HeadSpec(in_features=10, num_classes=4, hidden_units=6, dropout=0.5))
    assert head(torch.randn(3, 10)).shape == (3, 4)
    assert [type(m) for m in head] == FULL_HEAD


# --- architecture names ---------------------------------------------------------------------


def test_unknown_arch_is_a_config_error_listing_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_model("resnet9000", 3)
    message = str(info.value)
    assert "'resnet9000'" in message
    for arch in ("resnet18", "densenet121", "vgg16", "efficientnet_b0", "convnext_tiny"):
        assert arch in message


def test_architectures_without_a_known_head_type_are_not_offered():
    archs = list_archs()
    assert set(ARCHS) <= set(archs)
    assert "vit_b_16" not in archs and "googlenet" not in archs and "swin_t" not in archs
    with pytest.raises(ConfigError):
        build_model("vit_b_16", 3)


def test_fewer_than_two_classes_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_model("resnet18", 1)


# --- local weights files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    """A backbone state_dict file, as a user would download it, and the state itself."""
    torch.manual_seed(123)
    state = get_model("resnet18", weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(state, path)
    return path, state


def test_local_weights_file_is_loaded_into_the_backbone(resnet18_weights):
    path, state = resnet18_weights
    model, _ = build_model("resnet18", 3, str(path))
    loaded = model.state_dict()
    for key, tensor in state.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], tensor), key


def test_weights_wrapped_in_a_state_dict_key_are_unwrapped(resnet18_weights, tmp_path):
    _, state = resnet18_weights
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model, _ = build_model("resnet18", 3, str(path))
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


def test_old_style_densenet_weight_keys_are_renamed(tmp_path):
    torch.manual_seed(0)
    state = get_model("densenet121", weights=None).state_dict()
    old = {}
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # old files predate it
        for part in ("norm", "relu", "conv"):
            for n in ("1", "2"):
                key = key.replace(f".{part}{n}.", f".{part}.{n}.") if ".denselayer" in key else key
        old[key] = tensor
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet121-old.pth"
    torch.save(old, path)
    model, _ = build_model("densenet121", 3, str(path))
    layer = model.features.denseblock1.denselayer1
    assert torch.equal(layer.conv1.weight, state["features.denseblock1.denselayer1.conv1.weight"])


def test_weights_of_another_architecture_are_a_weights_error(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        build_model("resnet18", 3, str(path))
    assert "does not fit resnet18" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("source", ["torchvision-10-classes", "cnnkit-checkpoint"])
def test_weights_with_another_classifier_give_their_backbone(tmp_path, source):
    torch.manual_seed(0)
    if source == "cnnkit-checkpoint":  # a model trained on other data: its backbone, transferred
        trained, _ = build_model("resnet18", 7, "none", hidden_units=16)
        payload = {"format_version": 1, "state_dict": trained.state_dict(), "classes": list("abcdefg")}
    else:
        trained = get_model("resnet18", weights=None, num_classes=10)
        payload = trained.state_dict()
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    model, spec = build_model("resnet18", 3, str(path))
    assert spec.num_classes == 3
    assert torch.equal(model.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)
    assert torch.equal(model.bn1.running_mean, trained.bn1.running_mean)


def test_weights_missing_backbone_tensors_are_a_weights_error(tmp_path):
    state = get_model("resnet18", weights=None).state_dict()
    del state["layer4.1.conv2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"does not fit resnet18: missing key\(s\) layer4.1.conv2.weight$"):
        build_model("resnet18", 3, str(path))


def test_missing_weights_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_model("resnet18", 3, str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("content", [[1, 2, 3], {"conv1.weight": "not a tensor"}])
def test_weights_file_that_is_not_a_state_dict_is_a_weights_error(tmp_path, content):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(WeightsError, match="not a state_dict"):
        build_model("resnet18", 3, str(path))


def test_weights_file_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload()}, path)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_model("resnet18", 3, str(path))
    assert not marker.exists()


def test_unknown_torchvision_weights_name_is_a_config_error_listing_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_model("resnet18", 3, "IMAGENET9K_V9")
    assert "IMAGENET1K_V1" in str(info.value) and "DEFAULT" in str(info.value)


# --- pretrained weights from the torch hub cache, offline ----------------------------------


@pytest.fixture
def hub_download_refused(monkeypatch):
    """Any attempt to fetch weights fails (and is recorded) instead of touching the network."""
    import urllib.error

    import torch.hub

    attempts = []

    def refuse(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return attempts


def test_default_weights_offline_and_not_cached_is_a_weights_error_naming_the_way_out(empty_torch_home, hub_download_refused):
    url = get_model_weights("resnet18").DEFAULT.url
    expected_cache = os.path.join(str(empty_torch_home), "hub", "checkpoints", os.path.basename(url))
    with pytest.raises(WeightsError) as info:
        build_model("resnet18", 3, "DEFAULT")
    message = str(info.value)
    assert expected_cache in message
    assert "--weights PATH" in message and "--weights none" in message
    assert "\n" not in message
    assert hub_download_refused == [url]  # it tried the download, which failed
    assert not os.path.exists(expected_cache)


def test_default_weights_are_read_from_the_hub_cache_without_network(empty_torch_home, hub_download_refused):
    torch.manual_seed(7)
    state = get_model("resnet18", weights=None).state_dict()
    cached = hub_cache_path(get_model_weights("resnet18").DEFAULT.url)
    assert cached.startswith(str(empty_torch_home))
    os.makedirs(os.path.dirname(cached))
    torch.save(state, cached)
    model, _ = build_model("resnet18", 3, "DEFAULT")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert hub_download_refused == []


def test_hub_cache_path_follows_torch_home(empty_torch_home):
    path = hub_cache_path("https://download.pytorch.org/models/resnet18-f37072fd.pth")
    assert path == os.path.join(str(empty_torch_home), "hub", "checkpoints", "resnet18-f37072fd.pth")
