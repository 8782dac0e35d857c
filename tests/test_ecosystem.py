"""torchvision and segmentation_models_pytorch models through segprune (segprune.models.ecosystem).

Skipped where the optional packages are missing (torch 2.13.0+cpu cannot import torchvision); they run
in an environment with the ``test`` extra (torch 2.14.1 + torchvision 0.29.1 + smp 0.6.0 + timm 1.0.31).
Every model is randomly initialised (``weights=None``): nothing is downloaded.
"""
import copy
import importlib
import json
import warnings

import pytest
import torch

from segprune.config import DEFAULTS, merge, validate
from segprune.models import build_model, model_name_problems
from segprune.models.ecosystem import (EcosystemSegModel, adapt, build_ecosystem_model, config_problems,
                                       is_ecosystem_name)
from segprune.pruning import build_graph, discover_units, parts_without_units

K, K_CLS, S = 5, 4, 64


def test_names_and_keys_without_the_packages():
    """Name patterns and key checks need no optional package."""
    assert is_ecosystem_name("torchvision.lraspp_mobilenet_v3_large") and is_ecosystem_name("smp.Unet")
    assert not is_ecosystem_name("deeplabv3_resnet18") and not is_ecosystem_name(None)
    assert config_problems({"name": "smp.Unet"})[0].startswith("model.encoder_name=None: smp.Unet needs an encoder")
    assert config_problems({"name": "deeplabv3_resnet18", "encoder_name": "resnet34"}) == [
        "model.encoder_name='resnet34': used only by smp.* models; remove it"]
    assert "used only by torchvision.* models" in config_problems({"name": "smp.FPN", "encoder_name": "x",
                                                                    "aux_loss": True})[0]
    assert "model.width=0.5: not used by torchvision.fcn_resnet50" in config_problems(
        {"name": "torchvision.fcn_resnet50", "width": 0.5})[0]
    with pytest.raises(ValueError, match="model.encoder_name='resnet34': used only by smp"):
        build_model({"name": "deeplabv3_resnet18", "encoder_name": "resnet34"}, 3, 4)
    assert model_name_problems("deeplabv3_resnet18") == []
    assert "must be a registered model" in model_name_problems("deeplabv3_resnet152")[0]


def test_a_missing_package_is_named(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torchvision", "segmentation_models_pytorch") else real(name, *a))
    assert model_name_problems("torchvision.lraspp_mobilenet_v3_large") == [
        "model.name='torchvision.lraspp_mobilenet_v3_large' needs the optional package torchvision (pip install "
        "torchvision), which is not installed"]
    with pytest.raises(ImportError, match=r"needs the optional package segmentation-models-pytorch \(pip install"):
        build_model({"name": "smp.Unet", "encoder_name": "resnet34"}, 3, 4)
    cfg = merge(DEFAULTS, {"model": {"name": "smp.Unet", "encoder_name": "resnet34"}})
    assert any("segmentation-models-pytorch" in p for p in validate(cfg, raise_error=False))


# ---- with the packages ----------------------------------------------------------------------------
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - not installed, or built for another torch
        return False


libs = pytest.mark.skipif(not (_importable("torchvision") and _importable("segmentation_models_pytorch")),
                          reason="needs torchvision and segmentation_models_pytorch (pip install -e .[test])")

from segprune.api import load_pruned, prune_model, save_pruned  # noqa: E402

#: (model.name, encoder_name, expected parts with units)
FAMILIES = [
    ("torchvision.deeplabv3_resnet50", None),
    ("torchvision.deeplabv3_mobilenet_v3_large", None),
    ("torchvision.lraspp_mobilenet_v3_large", None),
    ("torchvision.fcn_resnet50", None),
    ("smp.Unet", "resnet34"),
    ("smp.DeepLabV3Plus", "resnet50"),
    ("smp.FPN", "efficientnet-b0"),
]


@pytest.fixture(autouse=True)
def _no_download(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"a download was attempted: {a}")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _build(name, enc, cls=None, **kw):
    torch.manual_seed(0)
    return build_ecosystem_model(name, K, {"encoder_name": enc, **kw}, cls_classes=cls)


@libs
@pytest.mark.parametrize("name,enc", FAMILIES)
def test_every_family_builds_traces_prunes_and_reloads(name, enc, tmp_path):
    model = _build(name, enc)
    x = torch.randn(2, 3, S, S)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        lib = model.library_model()(x)
    lib = lib["out"] if isinstance(lib, dict) else lib
    assert ref.shape == (2, K, S, S) and torch.equal(ref, lib)            # the wrapper is the library's forward
    res = prune_model(model, "fpgm", keep_ratio=0.5, parts=model.parts, never_prune=list(model.never_prune),
                      input_size=(S, S), num_classes=K)
    r = res.report
    assert {"backbone", "decoder"} >= set(r["parts"]) and "backbone" in r["parts"]
    assert r["flops"]["ratio"] < 0.9 and r["params"]["ratio"] < 0.8, r["flops"]
    p = res.model.eval()
    with torch.no_grad():
        out = p(x)
    assert out.shape == (2, K, S, S)
    for n in model.never_prune:                                            # classifier widths kept
        assert p.get_submodule(n).out_channels == model.get_submodule(n).out_channels
    folder = save_pruned(res, tmp_path / "m")
    assert json.loads((folder / "arch.json").read_text())["model_class"].endswith("EcosystemSegModel")
    fresh = _build(name, enc)
    torch.manual_seed(1)
    load_pruned(fresh, folder)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out)
    lib = fresh.library_model().eval()                                     # the library module, pruned too
    with torch.no_grad():
        y = lib(x)
    assert torch.equal(y["out"] if isinstance(y, dict) else y, out)


@libs
@pytest.mark.parametrize("method", ["fpgm", "slimming"])
def test_depthwise_units_make_mobilenets_shrink(method):
    """Issue 17's targets at keep 0.5 with the default settings (no include_coupled), FPGM and Slimming:
    LRASPP-MobileNetV3-Large <= 0.6x, DeepLabv3-MobileNetV3 <= 0.5x, smp FPN-EfficientNet-b0 <= 0.6x FLOPs
    (its four summed segmentation branches are one "merge" unit), output shapes unchanged. The γ are spread
    (U(0.5, 1.5)) as a trained network's are: with γ = 1 everywhere Slimming's scores tie and its per-part
    threshold would remove channels in unit order (benchmarks/ecosystem_flops.py, --gamma)."""
    for name, enc, bound in [("torchvision.lraspp_mobilenet_v3_large", None, 0.6),
                             ("torchvision.deeplabv3_mobilenet_v3_large", None, 0.5),
                             ("smp.FPN", "efficientnet-b0", 0.6)]:
        m = _build(name, enc)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
        kinds = [u.extra["kind"] for u in discover_units(m, build_graph(m, (S, S)))]
        assert kinds.count("depthwise") >= 10, (name, kinds)
        kw = {}
        if method == "slimming":
            kw = {"seg_loader": [(torch.randn(2, 3, S, S, generator=g), torch.randint(0, K, (2, S, S), generator=g))],
                  "method_cfg": {"epochs": 1, "lr_seg": 0.01, "alpha": 1e-3}}
        res = prune_model(m, method, keep_ratio=0.5, parts=m.parts, never_prune=list(m.never_prune),
                          input_size=(S, S), num_classes=K, **kw)
        assert res.report["flops"]["ratio"] <= bound, (name, method, res.report["flops"]["ratio"])
        assert res.report["output_shape"][-3:] == [K, S, S], res.report["output_shape"]
        with torch.no_grad():
            assert res.model.eval()(torch.randn(1, 3, S + 32, S)).shape == (1, K, S + 32, S)  # another size too
        if name == "smp.FPN":
            merge = res.report["units"]["decoder.seg_blocks.0.block.2.block.0"]
            assert merge["kept"] == merge["channels"] // 2 == 64            # the merged 128 channels halved
            seg = res.model.library_model().segmentation_head[0]
            assert seg.in_channels == 64 and seg.out_channels == K


@libs
def test_classification_head_for_mtp_and_dict_outputs(tmp_path):
    """adapt() on a user's torchvision instance: parts / never_prune / an ImageNet-style head (MobileNetV3's
    classifier), MTP finds it as backbone.fc; the auxiliary head of DeepLabV3 is trained through forward_aux."""
    from torchvision.models.segmentation import deeplabv3_resnet50, lraspp_mobilenet_v3_large
    torch.manual_seed(0)
    net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=K)
    a = adapt(net, cls_classes=K_CLS)
    m = a["model"]
    assert a["parts"] == {"backbone": "backbone.", "decoder": "classifier."}
    assert a["never_prune"] == ["classifier.low_classifier", "classifier.high_classifier", "backbone.fc"]
    assert isinstance(m.backbone.fc, torch.nn.Sequential) and m.backbone.fc[0].in_features == 960
    assert m.forward_cls(torch.zeros(2, 3, S, S)).shape == (2, K_CLS)
    g = torch.Generator().manual_seed(0)
    seg = [(torch.randn(2, 3, S, S, generator=g), torch.randint(0, K, (2, S, S), generator=g))]
    cls = [(torch.randn(2, 3, S, S, generator=g), torch.randint(0, K_CLS, (2,), generator=g))]
    res = prune_model(**a, method="mtp", keep_ratio=0.5, seg_loader=seg, cls_loader=cls, input_size=(S, S),
                      num_classes=K, method_cfg={"epochs": 1})
    p = res.model
    assert p.backbone.fc[0].in_features == p.backbone.body["16"][0].out_channels < 960   # the head follows
    assert p.forward_cls(torch.zeros(2, 3, S, S)).shape == (2, K_CLS)
    assert res.report["sparsity"]["steps"] == 1
    x = torch.randn(1, 3, S, S)
    p.eval()
    with torch.no_grad():   # the pruned copy's library model is the pruned torchvision module
        assert torch.equal(p.library_model()(x)["out"], p(x))
    assert p.library_model().classifier is p.classifier and p.library_model() is not net
    # torchvision's dict output with the FCN auxiliary head
    torch.manual_seed(0)
    dl = adapt(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=K, aux_loss=True))["model"]
    assert dl.aux_modules == ("aux_classifier",) and dl.aux_weights == (0.5,)
    assert {"aux_classifier.0", "aux_classifier.4", "classifier.4"} <= set(dl.never_prune)
    dl.eval()
    with torch.no_grad():
        main, aux = dl.forward_aux(torch.randn(1, 3, S, S))
        lib = dl.library_model()(torch.zeros(1, 3, S, S))
    assert main.shape == aux[0].shape == (1, K, S, S) and set(lib) == {"out", "aux"}
    from segprune.engine.train import seg_loss
    dl.train()
    y = torch.randint(0, K, (2, S, S))
    loss = seg_loss(dl, torch.randn(2, 3, S, S), y, 255)
    loss.backward()
    assert dl.aux_classifier[4].weight.grad is not None                   # the aux head is trained


@libs
def test_no_batchnorm_encoder_is_reported():
    """smp Segformer (MiT encoder, LayerNorm): only the decoder is prunable, and the report and a warning say why."""
    m = _build("smp.Segformer", "mit_b0")
    graph = build_graph(m, (S, S))
    why = parts_without_units(m, graph, discover_units(m, graph))
    assert list(why) == ["backbone"] and "no BatchNorm" in why["backbone"]
    with pytest.warns(UserWarning, match=r"part 'backbone' of EcosystemSegModel: no prunable unit"):
        res = prune_model(m, "fpgm", keep_ratio=0.5, parts=m.parts, never_prune=list(m.never_prune),
                          input_size=(S, S), num_classes=K)
    assert list(res.report["parts_without_units"]) == ["backbone"] and list(res.report["parts"]) == ["decoder"]


@libs
def test_local_pretrained_files(tmp_path):
    from torchvision.models import mobilenet_v3_large, resnet50
    from torchvision.models.segmentation import deeplabv3_resnet50
    from safetensors.torch import save_file
    # an ImageNet backbone checkpoint (torchvision ResNet-50): body + fc when the class counts agree
    torch.manual_seed(3)
    r50 = resnet50(weights=None)
    torch.save(r50.state_dict(), tmp_path / "r50.pth")
    m = _build("torchvision.deeplabv3_resnet50", None, cls=1000, pretrained=str(tmp_path / "r50.pth"))
    assert torch.equal(m.backbone.body.layer4[2].conv3.weight, r50.layer4[2].conv3.weight)
    assert torch.equal(m.backbone.fc.weight, r50.fc.weight)
    with pytest.warns(UserWarning, match=r"backbone.fc.weight \(1000 classes in the file, 4 in the model\)"):
        m = _build("torchvision.deeplabv3_resnet50", None, cls=K_CLS, pretrained=str(tmp_path / "r50.pth"))
    assert torch.equal(m.backbone.body.conv1.weight, r50.conv1.weight)
    # MobileNetV3's features.* / classifier.* (safetensors)
    mb = mobilenet_v3_large(weights=None)
    save_file({k: v.contiguous() for k, v in mb.state_dict().items()}, str(tmp_path / "mb.safetensors"))
    m = _build("torchvision.lraspp_mobilenet_v3_large", None, cls=1000, pretrained=str(tmp_path / "mb.safetensors"))
    assert torch.equal(m.backbone.body["16"][0].weight, mb.features[16][0].weight)
    assert torch.equal(m.backbone.fc[3].weight, mb.classifier[3].weight)
    # a whole torchvision model with another class count: everything but the classifier convs
    full = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    torch.save(full.state_dict(), tmp_path / "coco.pth")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = _build("torchvision.deeplabv3_resnet50", None, pretrained=str(tmp_path / "coco.pth"))
    assert any("classifier.4.weight (21 classes in the file, 5 in the model)" in str(x.message) for x in w)
    assert torch.equal(m.classifier[0].convs[1][0].weight, full.classifier[0].convs[1][0].weight)
    # the wrong architecture is refused, naming the file
    with pytest.raises(ValueError, match=r"r50.pth' does not fit torchvision LRASPP"):
        _build("torchvision.lraspp_mobilenet_v3_large", None, pretrained=str(tmp_path / "r50.pth"))
    # an smp model's own state dict
    u = _build("smp.Unet", "resnet34")
    torch.save(u.library_model().state_dict(), tmp_path / "unet.pth")
    torch.manual_seed(9)
    u2 = build_ecosystem_model("smp.Unet", K, {"encoder_name": "resnet34", "pretrained": str(tmp_path / "unet.pth")})
    assert all(torch.equal(a, b) for a, b in zip(u.state_dict().values(), u2.state_dict().values()))


@libs
def test_config_and_registry_accept_ecosystem_names():
    cfg = merge(DEFAULTS, {"model": {"name": "smp.FPN", "encoder_name": "efficientnet-b0"}})
    assert not [p for p in validate(cfg, raise_error=False) if p.startswith("model")]
    bad = merge(DEFAULTS, {"model": {"name": "smp.Unett", "encoder_name": "resnet34"}})
    assert any("has no architecture 'Unett'; known: smp.DPT" in p for p in validate(bad, raise_error=False))
    bad = merge(DEFAULTS, {"model": {"name": "torchvision.deeplabv3_resnet18"}})
    assert any("no segmentation builder 'deeplabv3_resnet18'" in p for p in validate(bad, raise_error=False))
    with pytest.raises(ValueError, match=r"model.encoder_name='resnet9000': smp.Unet cannot be built"):
        build_model({"name": "smp.Unet", "encoder_name": "resnet9000"}, K, K_CLS)
    with pytest.raises(ValueError, match=r"model.output_stride=8: not used by torchvision.fcn_resnet50"):
        build_model({"name": "torchvision.fcn_resnet50", "output_stride": 8}, K, K_CLS)
    with pytest.raises(ValueError, match=r"model.aux_loss=True: torchvision.lraspp_mobilenet_v3_large has no auxiliary"):
        build_model({"name": "torchvision.lraspp_mobilenet_v3_large", "aux_loss": True}, K, K_CLS)
    m = build_model({"name": "torchvision.lraspp_mobilenet_v3_large"}, K, K_CLS)   # the CLI's path: with the head
    assert isinstance(m, EcosystemSegModel) and m.backbone(torch.zeros(2, 3, S, S)).shape == (2, K_CLS)
    assert "backbone.fc" in m.never_prune
    with pytest.raises(TypeError, match=r"neither a torchvision segmentation model \(with .backbone and "
                                        r".classifier\) nor a segmentation_models_pytorch"):
        adapt(copy.deepcopy(m.classifier))


@libs
def test_cli_run_reports_a_part_without_units(tmp_path, capsys):
    """`segprune run` with smp Segformer (MiT encoder, LayerNorm): the sparsity stage's log, done.json,
    metrics.json and report.md name the backbone as not pruned, with the reason; the decoder is pruned."""
    import yaml

    from conftest import TINY
    from segprune.cli import main
    cfg = copy.deepcopy(TINY)
    cfg["model"] = {"name": "smp.Segformer", "encoder_name": "mit_b0"}
    cfg["data"]["cls"].update(input_size=[32, 32], image_size=[32, 32])
    cfg["train"] = {"pretrain_cls": {"epochs": 0, "lr": 0.05}, "seg": {"epochs": 1, "lr": 0.01}}
    cfg["method"] = {"name": "fpgm"}
    cfg["finetune"] = {"cls": {"epochs": 0, "lr": 0.01}, "seg": {"epochs": 1, "lr": 0.01}}
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "seg.yaml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "part 'backbone': no prunable unit" in printed and "no BatchNorm" in printed
    done = json.loads(next((out / "stages").glob("*_sparsity/done.json")).read_text())
    assert list(done["parts_without_units"]) == ["backbone"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["parts_without_units"]) == ["backbone"] and "no BatchNorm" in metrics["parts_without_units"]["backbone"]
    assert list(metrics["kept_per_part"]) == ["decoder"]
    report = (out / "report.md").read_text()
    assert "Part `backbone` was not pruned: no prunable unit" in report
