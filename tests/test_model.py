"""The CGPN network against the paper: shapes, feature counts per variant, stripe rows, parameter count."""

from __future__ import annotations

import pytest
import torch
import torchvision

from cgpn.errors import ConfigError, PretrainedWeightsError
from cgpn.model import build_model


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("size", "grid"), [((384, 128), (24, 8)), ((192, 64), (12, 4))])
def test_branch_maps_keep_stride_16(size, grid):
    """SPEC 1: layer4 at stride 1 in every branch, so T is H/16 x W/16 (24 x 8 at 384 x 128)."""
    model = build_model("cgpn", 10, backbone="resnet18", pretrained=False).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, *size))
    assert [tuple(t.shape) for t in maps] == [(2, 512, *grid)] * 3


def test_resnet50_maps_and_test_feature_at_384x128():
    model = build_model("cgpn", 751, backbone="resnet50", pretrained=False).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 3, 384, 128))
        feature = model.forward_head(maps)[1]
    assert [tuple(t.shape) for t in maps] == [(1, 2048, 24, 8)] * 3
    assert sum(f.shape[1] for f in feature.values()) == 3072  # 12 x 256 (Section 3.1)


# (variant, reduced features, triplet features, MSE pairs, test dim): Table 2 and SPEC
VARIANTS = [
    ("cgpn", 12, 3, 6, 3072),  # 3 global + 9 coarse local; 3 branches x 2 halves supervised
    ("cgpn1", 3, 3, 6, 768),  # global only
    ("cgpn2", 12, 3, 6, 3072),  # 3 global + 2 + 3 + 4 fine stripes
    ("cgpn3", 9, 9, 0, 2304),  # local only: the triplet loss acts on the local features
    ("cgpn4", 12, 3, 0, 3072),  # global convs without MSE
    ("mgn", 8, 3, 0, 2048),  # MGN: 3 global + 2 + 3 stripes
]


@pytest.mark.parametrize(("name", "n_tri"), [("cgpn", 12), ("cgpn1", 3), ("cgpn3", 9), ("mgn", 8)])
def test_triplet_on_every_part(name, n_tri):
    """model.triplet_parts=all (Section 3.2's reading): the triplet loss sees every reduced feature, globals first."""
    model = build_model(name, 7, backbone="resnet18", pretrained=False, triplet_parts="all")
    out = model(torch.randn(4, 3, 64, 32))
    assert len(out.triplet_features) == n_tri
    assert all(t is out.features[n] for t, n in zip(out.triplet_features, out.features))


@pytest.mark.parametrize(("name", "n_feat", "n_tri", "n_mse", "dim"), VARIANTS)
def test_variant_outputs(name, n_feat, n_tri, n_mse, dim):
    model = build_model(name, 7, backbone="resnet18", pretrained=False)
    out = model(torch.randn(4, 3, 64, 32))
    assert len(out.features) == len(out.logits) == n_feat
    assert all(f.shape == (4, 256) for f in out.features.values())
    assert all(x.shape == (4, 7) for x in out.logits.values())
    assert len(out.triplet_features) == n_tri
    assert len(out.supervision) == n_mse
    assert all(p.shape == t.shape == (4, 512) for p, t in out.supervision)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 32)).shape == (2, dim)


def test_fine_variant_has_one_feature_per_stripe():
    names = build_model("cgpn2", 5, backbone="resnet18", pretrained=False).feature_names
    assert names[3:] == ["b1_0_1", "b1_1_2", "b2_0_1", "b2_1_2", "b2_2_3", "b3_0_1", "b3_1_2", "b3_2_3", "b3_3_4"]


# SPEC "local part", at h = 24 rows: feature name -> rows of T it pools (worked out from Fig. 3).
COARSE_ROWS_24 = {
    "b1_0_1": (0, 12), "b1_1_2": (12, 24),  # branch 1: two halves
    "b2_0_2": (0, 16), "b2_1_3": (8, 24),  # branch 2: stripes of 8 rows, adjacent pairs (2/3 height)
    "b3_0_3": (0, 18), "b3_1_4": (6, 24),  # branch 3: stripes of 6 rows, triples (3/4)
    "b3_0_2": (0, 12), "b3_1_3": (6, 18), "b3_2_4": (12, 24),  # ... and pairs (1/2)
}


def test_coarse_stripes_pool_the_rows_of_the_paper():
    model = build_model("cgpn", 5, backbone="resnet18", pretrained=False).eval()
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, 384, 128))
        pooled = model.forward_head(maps)[0]
    assert set(COARSE_ROWS_24) == {n for n in pooled if n.startswith("b")}
    for name, (r0, r1) in COARSE_ROWS_24.items():
        t = maps[int(name[1]) - 1]
        expected = t[:, :, r0:r1].amax(dim=(2, 3))  # global max pooling of the combined stripe
        torch.testing.assert_close(pooled[name].flatten(1), expected, rtol=0, atol=0)
        assert (r1 - r0) / 24 >= 0.5  # the coarse rule: at least half the height


def test_global_supervision_targets_are_the_pooled_halves():
    model = build_model("cgpn", 5, backbone="resnet18", pretrained=False)
    model.train()
    maps = model.forward_features(torch.randn(2, 3, 128, 64))  # 8 rows
    _, _, pairs = model.forward_head(maps)
    for b, t in enumerate(maps):
        upper, lower = pairs[2 * b][1], pairs[2 * b + 1][1]
        torch.testing.assert_close(upper, t[:, :, :4].amax(dim=(2, 3)))
        torch.testing.assert_close(lower, t[:, :, 4:].amax(dim=(2, 3)))


def test_parameter_count_of_cgpn_resnet50_with_751_classes():
    """Derived from torchvision's ResNet-50 and the head formulas of SPEC, not from the model."""
    r = torchvision.models.resnet50()
    c, d, k = 2048, 256, 751
    trunk = sum(_count(m) for m in (r.conv1, r.bn1, r.layer1, r.layer2, r.layer3[0]))
    branch = _count(r.layer3) - _count(r.layer3[0]) + _count(r.layer4)
    global_convs = 2 * (c * c + c)  # two 1x1 convs c -> c with bias, per branch
    head = lambda cin: cin * d + 2 * d + d * k + k  # noqa: E731  1x1 conv (no bias) + BN + linear classifier
    expected = trunk + 3 * (branch + global_convs) + 3 * head(2 * c) + 9 * head(c)
    model = build_model("cgpn", k, backbone="resnet50", pretrained=False)
    assert _count(model) == expected == 99_974_004


def test_branches_start_from_the_same_imagenet_weights(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("cgpn", 5, backbone="resnet18", pretrained=str(path))
    torch.testing.assert_close(model.trunk.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.trunk.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    for branch in model.branches:
        own = dict(branch.named_parameters())  # torchvision's names: layer3.1.* is res_conv4_2
        torch.testing.assert_close(own["layer3.1.conv2.weight"], reference.layer3[1].conv2.weight)
        torch.testing.assert_close(own["layer4.1.conv1.weight"], reference.layer4[1].conv1.weight)
    assert model.branches[0].layer4[0].conv1.weight.data_ptr() != model.branches[1].layer4[0].conv1.weight.data_ptr()


def test_offline_without_weights_file_says_where_to_put_it(monkeypatch, tmp_path):
    import urllib.error

    from torchvision.models import ResNet18_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as err:
        build_model("cgpn", 5, backbone="resnet18", pretrained=True)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "model.pretrained=false" in message


def test_weights_of_another_backbone_are_refused(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="do not fit resnet18"):
        build_model("cgpn", 5, backbone="resnet18", pretrained=str(path))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "cgpn9"}, "unknown model 'cgpn9'"),
    ({"name": "cgpn", "backbone": "vgg16"}, "unknown backbone 'vgg16'"),
    ({"name": "cgpn", "local_part": "tiny"}, "model.local_part must be one of"),
])
def test_bad_names_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_model(num_classes=5, pretrained=False, **{"backbone": "resnet18", **kwargs})
