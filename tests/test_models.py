import pytest
import torch

from segprune.models import build_model, list_models
from segprune.models.resnet import ResNet


@pytest.mark.parametrize("os_", [8, 16])
def test_deeplab_output_shape_and_stride(os_):
    m = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "output_stride": os_}, 7, 3).eval()
    x = torch.randn(2, 3, 64, 48)
    assert m(x).shape == (2, 7, 64, 48)
    assert m.backbone.forward_features(x).shape[-2:] == (64 // os_, 48 // os_)
    assert m.forward_cls(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_torchvision_names_and_parts():
    m = build_model({"name": "deeplabv3_resnet50", "width": 0.125}, 5, 10)
    names = set(dict(m.named_modules()))
    for n in ("backbone.conv1", "backbone.layer4.2.conv3", "backbone.fc", "classifier.0.convs.4.1",
              "classifier.0.project.0", "classifier.4"):
        assert n in names
    assert m.parts == {"backbone": "backbone.", "decoder": "classifier."}
    assert "classifier.4" in m.never_prune


def test_bad_model_arguments():
    with pytest.raises(KeyError, match="deeplabv3_resnet18"):
        build_model({"name": "nope"}, 3, 3)
    with pytest.raises(ValueError, match="output_stride"):
        ResNet(18, output_stride=4)
    with pytest.raises(ValueError, match="multi_grid"):
        ResNet(50, multi_grid=(1, 2))
    assert "deeplabv3_resnet101" in list_models()


def test_full_size_r101_param_count():
    # torchvision deeplabv3_resnet101 has 60,996,202 params incl. its aux FCN head (2,365,205): 58,630,997 without
    m = build_model({"name": "deeplabv3_resnet101"}, 21, 1000)
    n = sum(p.numel() for k, p in m.named_parameters() if not k.startswith("backbone.fc"))
    assert n == 58_630_997, n
