"""Test-time protocol: multi-scale + flip (softmax averaging) and sliding-window inference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segprune.config import DEFAULTS, validate
from segprune.engine.evaluate import (
    PROTOCOL_DEFAULTS,
    check_protocol,
    eval_protocol,
    evaluate_segmentation,
    predict_logits,
    slide_logits,
)
from segprune.engine.metrics import SegmentationMetric
from segprune.models import build_model

K = 4


def _x(n=2, h=20, w=30, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _conv(k: int, seed: int = 0, symmetric: bool = False) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, K, k, padding=k // 2)
    if symmetric:  # a kernel that is its own mirror image: the conv commutes with a horizontal flip
        with torch.no_grad():
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv.eval()


class HalfRes(nn.Module):
    """Logits at half the input resolution (as a network without a final upsampling)."""

    def __init__(self):
        super().__init__()
        self.conv = _conv(1)

    def forward(self, x):
        return nn.functional.avg_pool2d(self.conv(x), 2, ceil_mode=True)


class ScaleTrap(nn.Module):
    """Class 0 with a moderate logit (3) at widths >= 20, class 1 with a huge logit (100) at
    smaller widths: 'wrong and over-confident at one scale'. Records the input sizes it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        n, _, h, w = x.shape
        self.seen.append((h, w))
        out = torch.zeros(n, 2, h, w)
        if w < 20:
            out[:, 1] = 100.0
        else:
            out[:, 0] = 3.0
        return out


def _tiny_deeplab():
    torch.manual_seed(0)
    return build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16}, K, 4).eval()


# --------------------------------------------------------------------------- defaults are plain model(x)

@torch.no_grad()
def test_default_protocol_is_bitwise_plain_forward():
    model = _tiny_deeplab()
    x = _x(2, 24, 32)
    assert torch.equal(predict_logits(model, x), model(x))
    assert torch.equal(predict_logits(model, x, scales=[1.0]), model(x))  # multi-scale [1.0] == single scale
    assert eval_protocol({"latency_runs": 3}) == PROTOCOL_DEFAULTS  # a config section from before the keys
    assert eval_protocol(DEFAULTS["eval"]) == PROTOCOL_DEFAULTS
    # evaluate_segmentation: identical confusion to the loop it replaced, labels at 2x the input size
    y = torch.randint(0, K, (2, 48, 64), generator=torch.Generator().manual_seed(1))
    y[:, :4] = 255
    loader = [(x[:1], y[:1]), (x[1:], y[1:])]
    old = SegmentationMetric(K, 255)
    for xb, yb in loader:
        old.update(model(xb), yb)
    for kwargs in ({}, {"protocol": DEFAULTS["eval"]}, {"protocol": {}}):
        new = evaluate_segmentation(model, loader, K, 255, **kwargs)
        assert new["confusion"] == old.compute()["confusion"] and new["miou"] == old.compute()["miou"]


# --------------------------------------------------------------------------- sliding window

@torch.no_grad()
@pytest.mark.parametrize("crop", [(20, 30), (64, 64)])  # the image itself; larger than the image
def test_slide_single_window_equals_whole_image_exactly(crop):
    x = _x(2, 20, 30)
    for model in (_conv(3), _tiny_deeplab()):
        whole = model(x)
        assert torch.equal(slide_logits(model, x, crop, crop), whole)
        assert torch.equal(predict_logits(model, x, mode="slide", crop_size=crop, stride=None), whole)


@torch.no_grad()
def test_slide_overlapping_windows_average_to_whole_for_translation_equivariant_model():
    x = _x(2, 20, 30)
    crop, stride = (8, 12), (5, 7)  # 4 x 4 windows, overlaps of 3 and 5 pixels, last ones shifted to the border
    pointwise = _conv(1)
    out = slide_logits(pointwise, x, crop, stride)
    assert out.shape == (2, K, 20, 30)
    torch.testing.assert_close(out, pointwise(x), rtol=0, atol=1e-6)
    # the count map: constant logits stay exactly constant wherever 1, 2, 3 or 4 windows overlap
    ones = slide_logits(lambda t: torch.ones(t.shape[0], K, *t.shape[-2:]), x, crop, stride)
    assert torch.equal(ones, torch.ones(2, K, 20, 30))
    # a 3x3 conv with zero padding sees the window borders: slide differs from whole at the seams
    conv3 = _conv(3)
    diff = (slide_logits(conv3, x, crop, stride) - conv3(x)).abs().amax(dim=(0, 1))
    assert diff.max() > 1e-3
    assert diff[0, 0] < 1e-6 and diff[19, 29] < 1e-6  # corners: one window, its padding is the image's


@torch.no_grad()
def test_slide_with_low_resolution_logits_and_windows_of_a_real_network():
    x = _x(1, 20, 30)
    out = slide_logits(HalfRes(), x, (8, 8), (6, 6))
    assert out.shape == (1, K, 20, 30) and torch.isfinite(out).all()
    model = _tiny_deeplab()
    out = predict_logits(model, x, mode="slide", crop_size=[16, 16], stride=[8, 10])
    assert out.shape == (1, K, 20, 30)
    assert not torch.allclose(out, model(x))  # windows of a network with global pooling: not the same


# --------------------------------------------------------------------------- flip and scales

@torch.no_grad()
def test_flip_averaging_on_flip_equivariant_model_equals_no_flip():
    x = _x()
    sym = _conv(3, symmetric=True)
    assert torch.allclose(sym(x.flip(-1)).flip(-1), sym(x), atol=1e-6)  # the model is flip-equivariant
    out = predict_logits(sym, x, flip=True)
    torch.testing.assert_close(out, sym(x).log_softmax(1), rtol=0, atol=1e-5)
    assert torch.equal(out.argmax(1), sym(x).argmax(1))
    # a model that is not flip-equivariant: the flipped view is flipped back and its probabilities averaged
    asym = _conv(3, seed=1)
    out = predict_logits(asym, x, flip=True)
    expected = (asym(x).softmax(1) + asym(x.flip(-1)).flip(-1).softmax(1)) / 2
    torch.testing.assert_close(out.softmax(1), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(out, asym(x).log_softmax(1), atol=1e-3)


@torch.no_grad()
def test_multi_scale_identical_views_and_resizing():
    x = _x(2, 16, 24)
    conv = _conv(1)
    torch.testing.assert_close(predict_logits(conv, x, scales=[1.0, 1.0]), conv(x).log_softmax(1), rtol=0, atol=1e-6)
    trap = ScaleTrap()
    out = predict_logits(trap, _x(2, 15, 22), scales=[0.5, 0.75, 1.25], flip=True, out_size=(32, 48))
    assert out.shape == (2, 2, 32, 48)
    # int(h * s + 0.5) as mmsegmentation rounds: 15 x 22 -> 8 x 11, 11 x 17, 19 x 28; each also flipped
    assert trap.seen == [(8, 11), (8, 11), (11, 17), (11, 17), (19, 28), (19, 28)]


@torch.no_grad()
def test_softmax_averaging_outvotes_an_overconfident_wrong_scale():
    """Documented effect: the probabilities of the views are averaged, so a single view that is
    wrong with huge logits counts as one vote out of three; averaging logits would let it win."""
    x = _x(1, 16, 24)
    trap = ScaleTrap()
    scales = [0.5, 1.0, 1.5]  # widths 12 (wrong, logit 100), 24 and 36 (right, logit 3)
    assert (trap(x).argmax(1) == 0).all()
    assert (predict_logits(trap, x, scales=[0.5]).argmax(1) == 1).all()  # the wrong scale alone
    out = predict_logits(trap, x, scales=scales)
    p_right = torch.tensor([3.0, 0.0]).softmax(0)  # (0.9526, 0.0474)
    expected = (2 * p_right + torch.tensor([0.0, 1.0])) / 3  # the wrong view: class 1 with probability ~1
    torch.testing.assert_close(out.softmax(1)[0, :, 5, 7], expected, rtol=0, atol=1e-6)
    assert (out.argmax(1) == 0).all()  # two right views out of three win
    logit_mean = (2 * torch.tensor([3.0, 0.0]) + torch.tensor([0.0, 100.0])) / 3
    assert logit_mean.argmax() == 1  # averaging logits instead would have predicted the wrong class


@torch.no_grad()
def test_evaluate_segmentation_with_paper_protocol():
    model = nn.Sequential(_conv(3, seed=2), nn.BatchNorm2d(K)).eval()  # varied predictions (unlike an untrained net)
    x = _x(2, 16, 24)
    y = torch.randint(0, K, (2, 32, 48), generator=torch.Generator().manual_seed(2))
    loader = [(x, y)]
    ev = {**DEFAULTS["eval"], "scales": [0.75, 1.0, 1.25], "flip": True}
    m = evaluate_segmentation(model, loader, K, 255, protocol=ev)
    pred = predict_logits(model, x, scales=[0.75, 1.0, 1.25], flip=True, out_size=(32, 48)).argmax(1)
    ref = SegmentationMetric(K, 255)
    ref.update(pred, y)
    assert m["confusion"] == ref.compute()["confusion"] and sum(map(sum, m["confusion"])) == 2 * 32 * 48
    assert m["confusion"] != evaluate_segmentation(model, loader, K, 255)["confusion"]  # the protocol is used
    sl = evaluate_segmentation(model, loader, K, 255, mode="slide", crop_size=[16, 16], stride=[8, 8])
    assert 0 <= sl["miou"] <= 1
    model.train()
    evaluate_segmentation(model, loader, K, 255, scales=[0.5, 1.0])
    assert model.training  # mode restored


# --------------------------------------------------------------------------- validation

def test_protocol_errors_and_config_validation():
    assert check_protocol([0.5, 1], True, "slide", [8, 8], None) == ((0.5, 1.0), True, "slide", (8, 8), (8, 8))
    for kwargs, needle in (({"scales": []}, "scales"), ({"scales": [0.5, -1]}, "scales"),
                           ({"flip": 1}, "flip"), ({"mode": "tile"}, "mode"),
                           ({"mode": "slide"}, "crop_size"), ({"mode": "slide", "crop_size": [8, 0]}, "crop_size"),
                           ({"mode": "slide", "crop_size": [8, 8], "stride": [9, 8]}, "stride")):
        with pytest.raises(ValueError, match=needle):
            check_protocol(**kwargs)
    with pytest.raises(ValueError, match="crop_size"):
        evaluate_segmentation(_conv(1), [], K, protocol={"mode": "slide"})
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        predict_logits(_conv(1), torch.zeros(3, 8, 8))
    cfg = copy.deepcopy(DEFAULTS)
    assert validate(cfg, raise_error=False) == []
    cfg["eval"].update(scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True, mode="slide", crop_size=[512, 1024],
                       stride=[341, 683])
    assert validate(cfg, raise_error=False) == []
    cfg["eval"].update(scales=[0.0], flip="yes", mode="tiles", crop_size=[512], stride=[600, 683])
    bad = "\n".join(validate(cfg, raise_error=False))
    for key in ("eval.scales", "eval.flip", "eval.mode", "eval.crop_size"):
        assert key in bad
    cfg["eval"].update(scales=[1.0], flip=False, mode="slide", crop_size=None, stride=None)
    assert "eval.crop_size" in "\n".join(validate(cfg, raise_error=False))
    cfg["eval"].update(crop_size=[512, 512], stride=[600, 100])
    assert "eval.stride" in "\n".join(validate(cfg, raise_error=False))


def test_plain_protocol_keeps_old_fingerprints_and_multiscale_changes_only_evaluate():
    """Runs made before eval.scales/flip/mode existed keep their fingerprints; a real protocol
    change invalidates only the evaluate stage (every trained stage stays shareable)."""
    import copy
    from segprune.config import DEFAULTS, merge
    from segprune.pipeline import stage_fingerprints
    cfg = merge(DEFAULTS, {})
    old = copy.deepcopy(cfg)
    for k in ("scales", "flip", "mode", "crop_size", "stride"):
        del old["eval"][k]
    assert stage_fingerprints(cfg) == stage_fingerprints(old)
    ms = copy.deepcopy(cfg)
    ms["eval"].update(scales=[0.5, 1.0, 1.5], flip=True)
    a, b = stage_fingerprints(cfg), stage_fingerprints(ms)
    assert [s for s in a if a[s] != b[s]] == ["evaluate"]


def test_native_size_evaluation_with_input_size_null(tmp_path):
    """``data.seg.input_size: null``: images are evaluated at their native size (here 40x36, not the
    32x32 crop), FLOPs/latency/tracing use crop_size, and the report says so. A batch of several
    native-size images is refused by the config check."""
    import copy
    import json

    import yaml

    from conftest import TINY
    from segprune.cli import main
    from segprune.config import ConfigError, load_config
    from segprune.pipeline import Pipeline

    cfg = copy.deepcopy(TINY)
    cfg["data"]["seg"].update(input_size=None, image_size=[40, 36], crop_size=[32, 32], eval_batch_size=1)
    cfg["train"]["seg"]["epochs"] = 1
    path = tmp_path / "native.yaml"
    path.write_text(yaml.safe_dump(cfg))
    bad = copy.deepcopy(cfg)
    bad["data"]["seg"]["eval_batch_size"] = 4
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="data.seg.eval_batch_size=4: must be 1 when data.seg.input_size is null"):
        load_config(tmp_path / "bad.yaml")
    out = tmp_path / "run"
    pipe = Pipeline(load_config(path), out, quiet=True)
    assert tuple(pipe.seg_eval[0][0].shape) == (3, 40, 36) and tuple(pipe.seg_eval[0][1].shape) == (40, 36)
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["input_size"] == [32, 32] and m["eval_native_size"] is True
    assert json.loads((out / "stages/04_prune/arch.json").read_text())["input_size"] == [32, 32]
    assert "images at native size (params/FLOPs/latency at 32x32)" in (out / "report.md").read_text()
    onnx = tmp_path / "native.onnx"  # exported at the crop size, checked on eval images resized to it
    assert main(["export", str(out), "--onnx", str(onnx), "--images", "2"]) == 0
    info = json.loads(onnx.with_name(onnx.name + ".json").read_text())
    assert info["input_size"] == [32, 32]
