"""Model zoo: PSPNet-R50, BiSeNet-R18, DeepLabv3 variants; pruning, auxiliary losses, pretrained loading.

Tiny models (``width`` 1/8, 40x40 inputs) for everything that runs a forward; the full-size models
are only built to count parameters against the MTP paper's Tables 2/3 (docs/models.md).
"""
import pytest
import torch
import torch.nn.functional as F

from segprune.engine.profile import count_params
from segprune.engine.train import seg_loss
from segprune.models import build_model, list_models
from segprune.models.deeplabv3 import DeepLabV3
from segprune.models.pretrained import load_pretrained
from segprune.models.resnet import ResNet
from segprune.pruning import build_graph, discover_units, prune_channels

TINY = {"pspnet_resnet50": {"output_stride": 8}, "bisenet_resnet18": {}, "deeplabv3_resnet50": {}}


def tiny(name, k=5, cls=3, **kw):
    torch.manual_seed(0)
    return build_model({"name": name, "width": 0.125, **TINY.get(name, {}), **kw}, k, cls)


def n_params(model, skip=()):
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


# ---- full-size parameter counts (no forward) --------------------------------------------------
def test_paper_param_counts():
    # DeepLabv3-R101 OS16, 21 classes (Table 2: 58.04M). Ours (torchvision layout) has a 3x3 conv+BN after
    # ASPP that the paper's implementation (chenxi116/DeepLabv3.pytorch) lacks: 589,824 + 512 params.
    tv = build_model({"name": "deeplabv3_resnet101"}, 21, 1000)
    assert n_params(tv, "backbone.fc") == 58_630_997
    assert n_params(tv) == 58_630_997 + 2048 * 1000 + 1000
    paper = DeepLabV3(ResNet(101, 16, (1, 1, 1), num_classes=1000), 21, head_conv=False)
    assert n_params(paper, "backbone.fc") == 58_630_997 - 589_824 - 512 == 58_040_661
    assert round(n_params(paper, "backbone.fc") / 1e6, 2) == 58.04
    # PSPNet-R50, 21 classes (Table 2: 46.71M), without fc and the training-only auxiliary head
    psp = build_model({"name": "pspnet_resnet50", "output_stride": 8}, 21, 1000)
    assert n_params(psp, ("backbone.fc", "aux_classifier")) == 46_592_597
    assert n_params(psp, "aux_classifier") - n_params(psp, ("backbone.fc", "aux_classifier")) == 2048 * 1000 + 1000
    assert count_params(psp) == n_params(psp, "aux_classifier")  # reported params: the deployed network
    deep = build_model({"name": "pspnet_resnet50", "output_stride": 8, "deep_stem": True}, 21, 1000)
    assert n_params(deep, ("backbone.fc", "aux_classifier")) == 46_716_373  # semseg's deep stem
    assert abs(n_params(deep, ("backbone.fc", "aux_classifier")) / 1e6 - 46.71) < 0.01
    # BiSeNet-R18, 19 classes (Table 3: 12.89M), without fc and the two auxiliary heads
    bis = build_model({"name": "bisenet_resnet18"}, 19, 1000)
    assert n_params(bis, ("backbone.fc", "aux_heads")) == 12_894_163
    assert round(n_params(bis, ("backbone.fc", "aux_heads")) / 1e6, 2) == 12.89


# ---- architecture details -------------------------------------------------------------------------
def test_dilation_conventions():
    # torchvision / DeepLabv3.pytorch: the first block of a dilated stage keeps the previous dilation
    r16 = ResNet(50, output_stride=16, width=0.125)
    assert [b.conv2.dilation[0] for b in r16.layer4] == [1, 2, 2]
    assert [b.conv2.stride[0] for b in r16.layer3] == [2, 1, 1, 1, 1, 1]
    r8 = ResNet(101, output_stride=8, width=0.125)
    assert r8.layer3[0].conv2.dilation[0] == 1 and {b.conv2.dilation[0] for b in r8.layer3[1:]} == {2}
    assert [b.conv2.dilation[0] for b in r8.layer4] == [2, 4, 4]
    # semseg's PSPNet: every 3x3 conv of the stage dilated
    psp = tiny("pspnet_resnet50").backbone
    assert {b.conv2.dilation[0] for b in psp.layer3} == {2} and {b.conv2.dilation[0] for b in psp.layer4} == {4}
    x = torch.randn(1, 3, 64, 48)
    for os_, r in ((16, r16), (8, r8), (8, psp)):
        assert r.eval().forward_features(x).shape[-2:] == (64 // os_, 48 // os_)


@pytest.mark.parametrize("name", ["deeplabv3_resnet101", "deeplabv3_resnet50"])
@pytest.mark.parametrize("os_", [8, 16])
def test_deeplab_output_strides(name, os_):
    m = tiny(name, output_stride=os_).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        assert m(x).shape == (1, 5, 64, 48)
        assert m.backbone.forward_features(x).shape[-2:] == (64 // os_, 48 // os_)


@pytest.mark.parametrize("name", ["pspnet_resnet50", "bisenet_resnet18"])
def test_interface_and_aux_outputs(name):
    m = tiny(name)
    assert name in list_models()
    x = torch.randn(2, 3, 40, 48)
    m.train()
    main, aux = m.forward_aux(x)
    assert main.shape == (2, 5, 40, 48) and len(aux) == len(m.aux_weights) >= 1
    assert all(a.shape == (2, 5, 40, 48) for a in aux)
    assert m.forward_cls(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert set(m.parts) == {"backbone", "decoder"} and "backbone.fc" in m.never_prune
    names = dict(m.named_modules())
    assert all(n in names for n in m.never_prune) and all(a in names for a in m.aux_modules)
    m.eval()
    with torch.no_grad():
        plain = m(x)
    ran = []
    hooks = [mod.register_forward_hook(lambda *_: ran.append(1)) for n, mod in names.items()
             if any(n == a or n.startswith(a + ".") for a in m.aux_modules)]  # a ModuleList never runs itself
    graded = m(x)  # eval with autograd on: forward still runs the main path only
    assert torch.equal(plain, graded) and not ran
    assert torch.equal(plain, m.forward_aux(x)[0].detach()) and ran  # the tracer's path runs the heads
    for h in hooks:
        h.remove()


def test_model_specific_keys_refused():
    with pytest.raises(ValueError, match="aspp_rates"):
        build_model({"name": "pspnet_resnet50", "aspp_rates": [6, 12, 18]}, 3, 3)
    with pytest.raises(ValueError, match="output_stride"):
        build_model({"name": "bisenet_resnet18", "output_stride": 8}, 3, 3)
    with pytest.raises(ValueError, match="ResNet-18"):
        from segprune.models.bisenet import build_bisenet
        build_bisenet(3, 3, depth=50)


# ---- auxiliary losses ---------------------------------------------------------------------------------
def test_seg_loss_adds_weighted_aux_terms():
    x, y = torch.randn(2, 3, 40, 40), torch.randint(0, 5, (2, 40, 40))
    y[0, :5] = 255
    for name, weights in (("pspnet_resnet50", (0.4,)), ("bisenet_resnet18", (1.0, 1.0))):
        m = tiny(name).train()
        assert m.aux_weights == weights
        torch.manual_seed(1)  # dropout
        got = seg_loss(m, x, y, 255)
        torch.manual_seed(1)
        main, aux = m.forward_aux(x)
        want = F.cross_entropy(main, y, ignore_index=255) + sum(w * F.cross_entropy(a, y, ignore_index=255)
                                                                for w, a in zip(weights, aux))
        assert torch.allclose(got, want) and got > F.cross_entropy(main, y, ignore_index=255)
        m.eval()  # no auxiliary terms outside training
        assert torch.equal(seg_loss(m, x, y, 255), F.cross_entropy(m(x), y, ignore_index=255))
    dl = tiny("deeplabv3_resnet50").train()  # no auxiliary heads: exactly the plain loss
    torch.manual_seed(1)
    got = seg_loss(dl, x, y, 255)
    torch.manual_seed(1)
    assert torch.equal(got, F.cross_entropy(dl(x), y, ignore_index=255))


# ---- pruning --------------------------------------------------------------------------------------------
EXPECTED_DECODER_UNITS = {
    "pspnet_resnet50": ({"classifier.0.stages.0.1", "classifier.0.stages.1.1", "classifier.0.stages.2.1",
                         "classifier.0.stages.3.1", "classifier.1"}, set()),
    "bisenet_resnet18": ({"decoder.spatial_path.0.0", "decoder.spatial_path.1.0", "decoder.spatial_path.2.0",
                          "decoder.spatial_path.3.0", "decoder.refines.1.0", "decoder.head.conv.0"},
                         # coupled groups (prune.prune_coupled): ARM0 + global context, ARM1 + refine0, FFM
                         {frozenset({"decoder.global_context.1", "decoder.arms.0.conv.0", "decoder.arms.0.attention.1"}),
                          frozenset({"decoder.refines.0.0", "decoder.arms.1.conv.0", "decoder.arms.1.attention.1"}),
                          frozenset({"decoder.ffm.conv.0", "decoder.ffm.attention.3"})}),
}


@pytest.mark.parametrize("name", ["pspnet_resnet50", "bisenet_resnet18"])
@pytest.mark.parametrize("coupled", [False, True])
def test_prune_half_of_every_unit(name, coupled):
    m = tiny(name)
    graph = build_graph(m, (32, 32))
    units = discover_units(m, graph, include_coupled=coupled)
    dec_single, dec_coupled = EXPECTED_DECODER_UNITS[name]
    dec = [u for u in units if u.part == "decoder"]
    assert {u.name for u in dec if not u.coupled} == dec_single
    assert {frozenset(u.convs) for u in dec if u.coupled} == (dec_coupled if coupled else set())
    bb = [u for u in units if u.part == "backbone"]
    blocks = 16 if name.startswith("pspnet") else 8
    assert sum(1 for u in bb if u.name.endswith(".conv1")) >= blocks  # first conv of every residual block
    assert all(u.part in ("backbone", "decoder") for u in units)  # auxiliary heads are never units
    assert not any(c.startswith(m.aux_modules) for u in units for c in u.convs)

    before = count_params(m)
    kept = {u.name: torch.arange(0, u.channels, 2) for u in units}
    prune_channels(m, units, kept, graph)
    after = count_params(m)
    assert after < 0.75 * before
    mods = dict(m.named_modules())
    for u in units:
        assert all(mods[c].out_channels == (u.channels + 1) // 2 for c in u.convs)
    x = torch.randn(2, 3, 40, 40)
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (2, 5, 40, 40)
    m.train()
    main, aux = m.forward_aux(x)  # the training-only heads followed the pruning of the features they read
    assert main.shape == (2, 5, 40, 40) and all(a.shape == (2, 5, 40, 40) for a in aux)
    assert m.forward_cls(x).shape == (2, 3)
    if name == "bisenet_resnet18":
        assert m.aux_heads[1].conv[0].in_channels == mods["decoder.refines.1.0"].out_channels < 16
    seg_loss(m, x, torch.randint(0, 5, (2, 40, 40)), 255).backward()


# ---- pretrained checkpoints --------------------------------------------------------------------------------
def test_pretrained_backbone_from_torchvision_layout(tmp_path):
    src = ResNet(50, output_stride=32, width=0.125, num_classes=1000)  # our names == torchvision's resnet50
    for p in src.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "resnet50.pth"
    torch.save(src.state_dict(), path)
    m = build_model({"name": "pspnet_resnet50", "width": 0.125, "output_stride": 8, "pretrained": str(path)}, 5, 1000)
    for k, v in src.state_dict().items():
        assert torch.equal(m.backbone.state_dict()[k], v), k  # fc loaded too: same class count
    # other class count: fc skipped and said so, the rest loaded
    with pytest.warns(UserWarning, match="fc.weight"):
        m2 = build_model({"name": "deeplabv3_resnet50", "width": 0.125, "pretrained": str(path)}, 5, 10)
    assert torch.equal(m2.backbone.layer4[2].conv3.weight, src.layer4[2].conv3.weight)
    assert not torch.equal(m2.backbone.fc.weight[:, :4], src.fc.weight[:10, :4])
    rep = load_pretrained(m2, path)
    assert rep["layout"] == "backbone" and set(rep["skipped"]) == {"fc.weight", "fc.bias"}


def test_pretrained_whole_deeplab_layout_and_safetensors(tmp_path):
    from safetensors.torch import save_file
    src = tiny("deeplabv3_resnet50", k=21)
    with torch.no_grad():
        for p in src.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))  # not the fresh model's init
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("backbone.fc")}  # torchvision: no fc
    sd["aux_classifier.0.weight"] = torch.zeros(64, 128, 3, 3)  # torchvision's FCN aux head: ignored
    torch.save(sd, tmp_path / "deeplabv3.pth")
    save_file(sd, str(tmp_path / "deeplabv3.safetensors"))
    for f in ("deeplabv3.pth", "deeplabv3.safetensors"):
        m = tiny("deeplabv3_resnet50", k=21)
        rep = load_pretrained(m, tmp_path / f)
        assert rep["layout"] == "model" and rep["ignored"] == ["aux_classifier.0.weight"]
        assert rep["loaded"] == len(sd) - 1 and "backbone.fc.weight" in rep["skipped"]
        m.eval(), src.eval()
        x = torch.randn(1, 3, 40, 40)
        with torch.no_grad():
            assert torch.equal(m(x), src(x)) and torch.isfinite(m(x)).all()
    # 11-class model from a 21-class file: only the last conv is skipped
    m11 = tiny("deeplabv3_resnet50", k=11)
    rep = load_pretrained(m11, tmp_path / "deeplabv3.pth")
    assert set(rep["skipped"]) >= {"classifier.4.weight", "classifier.4.bias"}
    assert torch.equal(m11.classifier[1].weight, src.classifier[1].weight)


def test_pretrained_mismatch_is_a_clear_error(tmp_path):
    r18 = tmp_path / "resnet18.pth"
    torch.save(ResNet(18, multi_grid=(1, 1), width=0.125).state_dict(), r18)
    with pytest.raises(ValueError, match=r"resnet18\.pth.*layer1\.0\.conv1\.weight file \(8, 8, 3, 3\) vs model "
                                         r"\(8, 8, 1, 1\)"):
        build_model({"name": "deeplabv3_resnet50", "width": 0.125, "pretrained": str(r18)}, 5, 10)
    with pytest.raises(ValueError, match=r"keys missing from the file: backbone\.layer1\.0\.conv3\.weight"):
        load_pretrained(tiny("deeplabv3_resnet50"), r18)
    bad = tmp_path / "other.pth"
    torch.save({"classifier.9.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match=r"other\.pth.*does not have: classifier\.9\.weight \(3,\)"):
        load_pretrained(tiny("bisenet_resnet18"), bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model({"name": "bisenet_resnet18", "pretrained": str(tmp_path / "nope.pth")}, 3, 3)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth.*cannot read"):
        load_pretrained(tiny("bisenet_resnet18"), junk)
    # rebuilding a saved run: the file is not read
    m = build_model({"name": "bisenet_resnet18", "width": 0.125, "pretrained": str(tmp_path / "nope.pth")}, 3, 3,
                    load_pretrained_weights=False)
    assert isinstance(m, torch.nn.Module)


def test_pretrained_is_a_config_key(tmp_path):
    from segprune.config import load_config
    from segprune.models import MODEL_DEFAULTS
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {name: pspnet_resnet50, output_stride: 8, pretrained: weights/resnet50.pth}\n")
    cfg = load_config(cfg_file)
    assert cfg["model"]["pretrained"] == "weights/resnet50.pth" and MODEL_DEFAULTS["pretrained"] is None
    with pytest.raises(FileNotFoundError, match="weights/resnet50.pth"):
        build_model(dict(cfg["model"]), 3, 3)
