"""segprune.api on a network that is not in the zoo: the U-Net of examples/unet_prune.py (skip concatenations)."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from segprune.api import load_pruned, prune_model, save_pruned
from segprune.checkpoint import CheckpointError
from segprune.engine.profile import count_params
from segprune.methods.mtp import MTP, cls_branch
from segprune.pruning import build_graph, discover_units

_spec = importlib.util.spec_from_file_location("unet_prune", Path(__file__).parents[1] / "examples" / "unet_prune.py")
unet_prune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(unet_prune)
UNet = unet_prune.UNet

K, K_CLS, W, S = 3, 3, 4, 16          # seg classes, cls classes, U-Net width, image side
PARTS = {"backbone": "enc.", "decoder": "dec."}
NEVER = ["head", "enc.blocks.1.3"]     # enc.blocks.1.3 has a BatchNorm: without never_prune it would be pruned
MTP_CFG = {"epochs": 1, "lr_seg": 0.05, "lr_cls": 0.05, "alpha1": 0.05, "alpha2": 0.05, "mu0": 0.1, "rho": 1.2,
           "mu_max": 5.0, "update_every": 1}


def _loaders(seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = TensorDataset(torch.randn(16, 3, S, S, generator=g), torch.randint(0, K, (16, S, S), generator=g))
    cls = TensorDataset(torch.randn(16, 3, S // 2, S // 2, generator=g), torch.randint(0, K_CLS, (16,), generator=g))
    return (DataLoader(seg, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)),
            DataLoader(cls, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2)))


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet(3, K, K_CLS, W)


def _x(n=2, seed=5):
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mtp_run():
    model = _unet()
    before = copy.deepcopy(model.state_dict())
    seg, cls = _loaders()
    res = prune_model(model, "mtp", keep_ratio=0.5, parts=PARTS, never_prune=NEVER, seg_loader=seg, num_classes=K,
                      cls_head="enc_fc", cls_loader=cls, input_size=(S, S), method_cfg=MTP_CFG, seed=0,
                      finetune={"cls": {"epochs": 1, "lr": 0.01}, "seg": {"epochs": 1, "lr": 0.01}})
    return model, before, res


def _concat_consistent(m):
    """Every consumer's input width equals what its producers now emit (across both concatenations)."""
    b = m.enc.blocks
    assert m.dec.up2.in_channels == b[2][3].out_channels
    assert m.dec.block2[0].in_channels == m.dec.up2.out_channels + b[1][3].out_channels     # cat([up2(s3), s2])
    assert m.dec.block1[0].in_channels == m.dec.block2[3].out_channels + b[0][3].out_channels  # cat([up(x), s1])
    assert m.head.in_channels == m.dec.block1[3].out_channels
    assert m.enc_fc.in_features == b[2][3].out_channels                                    # the classification head
    for blk in list(b) + [m.dec.block2, m.dec.block1]:
        assert blk[1].num_features == blk[0].out_channels and blk[3].in_channels == blk[0].out_channels


def test_mtp_prunes_the_unet_physically(mtp_run):
    model, before, res = mtp_run
    r, m = res.report, res.model
    assert type(m) is UNet and m is not model
    # the input model is untouched (inplace=False) and carries no leftover attributes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for obj in (model, m):
        assert not any(hasattr(obj, a) for a in ("parts", "never_prune", "cls_head", "forward_cls", "input_channels"))
    # smaller, as the report says
    assert r["params"]["before"] == count_params(_unet()) and r["params"]["after"] == count_params(m)
    assert r["params"]["after"] < 0.6 * r["params"]["before"] and r["flops"]["after"] < 0.7 * r["flops"]["before"]
    assert r["sparsity"]["steps"] == 4 and r["finetune"]["cls"]["iters"] == 4 and r["finetune"]["seg"]["iters"] == 4
    units = r["units"]
    assert set(units) == {"enc.blocks.0.0", "enc.blocks.0.3", "enc.blocks.1.0", "enc.blocks.2.0", "enc.blocks.2.3",
                          "dec.block2.0", "dec.block2.3", "dec.block1.0", "dec.block1.3"}
    for name, u in units.items():  # (the growing ℓ1 schedule may leave a whole unit to the other units' cuts)
        assert m.get_submodule(name).out_channels == u["kept"] <= u["channels"]
        assert u["part"] == ("backbone" if name.startswith("enc.") else "decoder")
        assert r["layer_widths"]["after"][name][1] == u["kept"] and r["layer_widths"]["before"][name][1] == u["channels"]
    for part, d in r["parts"].items():  # Ind thresholds: half of each part, min_channels=1 may add one per unit
        assert d["channels"] / 2 <= d["kept"] <= d["channels"] / 2 + d["units"], (part, d)
    # never_prune keeps its width; the consumers of everything else follow the producers
    assert m.enc.blocks[1][3].out_channels == 2 * W and m.enc.blocks[1][4].num_features == 2 * W
    assert m.head.out_channels == K
    _concat_consistent(m)
    with torch.no_grad():
        assert m.eval()(_x(3)).shape == (3, K, S, S)
        assert m.classify(_x(3)).shape == (3, K_CLS)


def test_pickle_free_round_trip_reproduces_outputs(mtp_run, tmp_path):
    _, _, res = mtp_run
    folder = save_pruned(res, tmp_path / "unet")
    assert sorted(p.name for p in folder.iterdir()) == ["arch.json", "model.safetensors"]
    arch = json.loads((folder / "arch.json").read_text())
    assert arch["setup"]["parts"] == PARTS and arch["setup"]["cls_head"] == ["enc_fc"]
    loaded = load_pruned(_unet(seed=7), folder)           # fresh instance, other random init
    assert count_params(loaded) == count_params(res.model)
    x = _x(4)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), res.model.eval()(x))
        assert torch.equal(loaded.classify(x), res.model.classify(x))
    assert not hasattr(loaded, "parts") and not hasattr(loaded, "forward_cls")
    with pytest.raises(CheckpointError, match="arch.json"):  # another width: the widths do not fit
        load_pruned(UNet(3, K, K_CLS, 2 * W), folder)
    (folder / "arch.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="not a file written by segprune.api.save_pruned"):
        load_pruned(_unet(), folder)


@pytest.mark.parametrize("method,mode", [("slimming", "uni"), ("uniform", "ind"), ("fpgm", "ind"), ("magnitude", "ind")])
def test_single_task_methods_need_no_classification(method, mode):
    seg, _ = _loaders()
    cfg = {"epochs": 1, "lr_seg": 0.05, "alpha": 0.05} if method == "slimming" else {}
    res = prune_model(_unet(), method, keep_ratio=0.5, parts=PARTS, never_prune=["head"], seg_loader=seg,
                      input_size=(S, S), threshold_mode=mode, method_cfg=cfg, finetune={"cls": {}, "seg": None})
    m, r = res.model, res.report
    assert r["finetune"]["cls"] == {"skipped": "no classification head (cls_head) or data (cls_loader)"}
    assert "enc.blocks.1.3" in r["units"] and r["params"]["after"] < r["params"]["before"]
    share = r["removed_gamma_share"]  # issue 15: the share of Σ|γ| the removal deleted, per part and in total
    assert set(share["parts"]) == {"backbone", "decoder"}
    if method == "slimming":  # the growing ℓ1 schedule drove the γ the budget removes to exact zero
        assert share["total"] == 0.0
    else:                     # no sparsity training: the removed channels still carry Σ|γ|
        assert 0.0 < share["total"] < 1.0
    assert r["compensation"]["mode"] == "interior"
    if method not in ("slimming", "magnitude"):  # per-layer methods: round(p * C) in every unit
        assert all(u["kept"] == round(0.5 * u["channels"]) for u in r["units"].values())
    else:                     # one global threshold: half of all channels overall (+ min_channels=1 per unit)
        kept, total = (sum(u[k] for u in r["units"].values()) for k in ("kept", "channels"))
        assert total // 2 <= kept <= total // 2 + len(r["units"])
        assert set(r["parts"]) == {"backbone", "decoder"}
    m.enc_fc = torch.nn.Linear(m.enc.blocks[2][3].out_channels, K_CLS)  # head not traced without cls_head
    _concat_consistent(m)
    assert m.eval()(_x()).shape == (2, K, S, S)


@pytest.mark.parametrize("method", ["thinet", "cap", "sirfp", "acosp"])
def test_other_methods_run_on_the_unet(method):
    seg, cls = _loaders()
    kw = dict(keep_ratio=0.5, parts=PARTS, seg_loader=seg, cls_head="enc_fc", cls_loader=cls, input_size=(S, S),
              method_cfg={"epochs": 1, "max_iters_per_epoch": 2, "calib_batches": 1, "samples_per_batch": 8})
    never = ["head"]
    if method == "thinet":  # s3 is read only by the ConvTranspose2d and the Linear head: nothing ThiNet can measure
        with pytest.raises(ValueError, match="unit enc.blocks.2.3 feeds no convolution.*list it in never_prune"):
            prune_model(_unet(), method, never_prune=never, **kw)
        never = ["head", "enc.blocks.2.3"]
    res = prune_model(_unet(), method, never_prune=never, **kw)
    assert res.report["params"]["after"] < res.report["params"]["before"]
    _concat_consistent(res.model)
    assert res.model.eval()(_x()).shape == (2, K, S, S)


def test_acosp_flops_target_fixes_widths_before_training():
    """ACoSP under a FLOPs target: the training keep ratio is searched first, the kept widths are its k."""
    from segprune.methods.acosp import acosp_k
    seg, cls = _loaders()
    res = prune_model(_unet(), "acosp", target_flops_ratio=0.5, flops_tolerance=0.05, parts=PARTS, never_prune=["head"],
                      seg_loader=seg, input_size=(S, S), min_channels=1,
                      method_cfg={"epochs": 1, "max_iters_per_epoch": 2, "options": {"min_keep": 1}})
    r = res.report
    assert abs(r["flops"]["ratio"] - 0.5) <= 0.05 and r["flops_target"]["flops_target_met"]
    p = r["flops_target"]["keep_ratio_found"]
    assert r["keep_ratio"] == p and r["sparsity"]["kept"] == sum(u["kept"] for u in r["units"].values())
    assert all(u["kept"] == acosp_k(u["channels"], p, 1) for u in r["units"].values())


def test_flops_target_and_custom_cls_forward(tmp_path):
    seg, cls = _loaders()
    res = prune_model(_unet(), "mtp", target_flops_ratio=0.5, flops_tolerance=0.05, parts=PARTS, never_prune=["head"],
                      seg_loader=seg, cls_loader=cls, cls_head="enc_fc", cls_forward=UNet.classify,
                      input_size=(S, S), method_cfg={**MTP_CFG, "max_iters_per_epoch": 2})
    r = res.report
    assert abs(r["flops"]["ratio"] - 0.5) <= 0.05 and r["flops_target"]["flops_target_met"]
    assert r["keep_ratio"] == r["flops_target"]["keep_ratio_found"] and 0 < r["keep_ratio"] < 1
    save_pruned(res, tmp_path / "u")
    with pytest.raises(ValueError, match="custom cls_forward"):
        load_pruned(_unet(), tmp_path / "u")
    loaded = load_pruned(_unet(), tmp_path / "u", cls_forward=UNet.classify)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_x()), res.model.eval()(_x()))


def test_zoo_model_through_the_api_keeps_its_own_attributes():
    from segprune.models import build_model
    torch.manual_seed(0)
    m = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 8}, K, K_CLS)
    parts, never = m.parts, m.never_prune
    g = torch.Generator().manual_seed(0)
    seg = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, K, (4, 32, 32), generator=g)),
                     batch_size=2)
    cls = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, K_CLS, (4,), generator=g)),
                     batch_size=2)
    res = prune_model(m, "mtp", keep_ratio=0.5, seg_loader=seg, cls_loader=cls, input_size=(32, 32), num_classes=K,
                      method_cfg=MTP_CFG, inplace=True)          # parts, never_prune, backbone.fc: the model's own
    assert res.model is m and m.parts is parts and m.never_prune == never and not hasattr(m, "input_channels")
    assert res.report["parts"]["backbone"]["kept"] < res.report["parts"]["backbone"]["channels"]
    assert m.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, K, 32, 32) and m.forward_cls(torch.zeros(1, 3, 16, 16)).shape == (1, K_CLS)


def test_mtp_couples_only_the_backbone_of_a_user_model():
    """W1 = a copy of the whole model; Eq. 5's W1 = W3 ties only the parameters under parts['backbone']."""
    import types
    m = _unet()
    m.parts, m.never_prune, m.cls_head = PARTS, ("head",), ("enc_fc",)
    m.forward_cls = types.MethodType(UNet.classify, m)
    assert cls_branch(m) == (m, "", ("enc_fc",))
    units = discover_units(m, build_graph(m, (S, S)))
    cfg = {"lam": 1.0, "alpha1": 1e-3, "alpha2": 1e-3, "mu0": 0.5, "rho": 1.5, "mu_max": 4.0, "lr_seg": 0.05,
           "lr_cls": 0.05, "momentum": 0.0, "weight_decay": 0.0, "l1_mode": "proximal", "keep_copy": "w3"}
    mtp = MTP(m, units, cfg)
    enc = [n for n, _ in m.named_parameters() if n.startswith("enc.")]
    assert mtp.shared == enc                                   # no decoder, head or enc_fc parameter
    assert mtp.forward_w1.__self__ is mtp.w1                   # the classification task runs on the copy
    src = mtp.score_sources()
    assert src and all(mod is mtp.w1.get_submodule(name) for name, mod in src.items())
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, K_CLS, (4,))
    mtp.step_w1(x, y, 0.1)
    assert not torch.equal(mtp.w1.enc_fc.weight, m.enc_fc.weight)
    assert torch.equal(mtp.w1.dec.block1[0].weight, m.dec.block1[0].weight)  # W1's decoder copy is never trained
    mtp.finalize()
    assert torch.equal(mtp.w1.enc_fc.weight, m.enc_fc.weight)


# ---- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.2, "half"])
def test_keep_ratio_outside_open_interval(ratio):
    seg, _ = _loaders()
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        prune_model(_unet(), "uniform", keep_ratio=ratio, parts=PARTS, seg_loader=seg, input_size=(S, S))


def test_unknown_part_prefix_and_module_names():
    m, (seg, _) = _unet(), _loaders()
    with pytest.raises(ValueError, match=r"parts\['backbone'\]: prefix 'encoder\.' matches no module of UNet "
                                         r"\(top-level modules: enc, dec, head, enc_fc\)"):
        prune_model(m, "slimming", keep_ratio=0.5, parts={"backbone": "encoder.", "decoder": "dec."}, seg_loader=seg,
                    input_size=(S, S))
    with pytest.raises(ValueError, match="prefix 'up.' matches no module"):
        prune_model(m, "uniform", keep_ratio=0.5, parts={"backbone": "enc.", "decoder": ["dec.", "up."]},
                    input_size=(S, S))
    with pytest.raises(ValueError, match="never_prune='heads' is not a module of UNet.*did you mean 'head'"):
        prune_model(m, "uniform", keep_ratio=0.5, parts=PARTS, never_prune=["heads"], input_size=(S, S))
    with pytest.raises(ValueError, match="parts is required"):
        prune_model(m, "uniform", keep_ratio=0.5, input_size=(S, S))
    assert not hasattr(m, "parts")


def test_mtp_without_classification_head_or_data():
    m, (seg, cls) = _unet(), _loaders()
    kw = dict(keep_ratio=0.5, parts=PARTS, seg_loader=seg, input_size=(S, S))
    with pytest.raises(ValueError, match="MTP .*missing: cls_head .*single-task method") as e:
        prune_model(m, "mtp", cls_loader=cls, **kw)
    assert "cls_loader" not in str(e.value).split("missing:")[1].split(". Without")[0]
    with pytest.raises(ValueError, match=r"missing: cls_loader \(classification batches"):
        prune_model(m, "mtp", cls_head="enc_fc", **kw)
    with pytest.raises(ValueError, match="missing: cls_head .*; cls_loader"):
        prune_model(m, "mtp", **kw)
    with pytest.raises(ValueError, match=r"missing: parts\['backbone'\]"):
        prune_model(m, "mtp", cls_head="enc_fc", cls_forward=UNet.classify, cls_loader=cls,
                    **{**kw, "parts": {"decoder": "dec."}})
    with pytest.raises(ValueError, match=r"default classification forward needs .*parts\['backbone'\] naming one"):
        prune_model(m, "mtp", cls_head="enc_fc", cls_loader=cls, **{**kw, "parts": {"backbone": ["enc.", "dec."]}})
    with pytest.raises(TypeError, match=r"two arguments \(model, x\)"):
        prune_model(m, "mtp", cls_head="enc_fc", cls_loader=cls, cls_forward=lambda x: m.classify(x), **kw)
    with pytest.raises(ValueError, match="(?s)invalid method_cfg:.*method.rho=1.0: must be > 1"):
        prune_model(m, "mtp", cls_head="enc_fc", cls_loader=cls, method_cfg={"rho": 1.0}, **kw)
    with pytest.raises(ValueError, match="unknown key"):
        prune_model(m, "mtp", cls_head="enc_fc", cls_loader=cls, method_cfg={"alpha_1": 1.0}, **kw)
    with pytest.raises(ValueError, match="num_classes=7"):
        prune_model(m, "mtp", cls_head="enc_fc", cls_loader=cls, num_classes=7, **kw)
    with pytest.raises(ValueError, match="method='mtp2' is not a known pruning method"):
        prune_model(m, "mtp2", **kw)
    assert not any(hasattr(m, a) for a in ("parts", "cls_head", "forward_cls"))


def test_flops_target_with_single_channel_input():
    """A grey-scale (1-channel) network follows a FLOPs target too: the search counts with in_channels=1."""
    from segprune.engine.profile import count_flops
    seg, _ = _loaders()
    torch.manual_seed(0)
    net = UNet(1, K, K_CLS, W)
    grey = DataLoader(TensorDataset(seg.dataset.tensors[0][:, :1], seg.dataset.tensors[1]), batch_size=4)
    f0 = count_flops(net, (S, S), 1)["flops"]
    res = prune_model(net, "fpgm", target_flops_ratio=0.6, flops_tolerance=0.05, parts=PARTS, never_prune=NEVER,
                      seg_loader=grey, input_size=(S, S), in_channels=1)
    f1 = count_flops(res.model, (S, S), 1)["flops"]
    assert abs(f1 / f0 - 0.6) <= 0.05 and res.report["flops_target"]["flops_target_met"]
    assert res.model.eval()(torch.randn(2, 1, S, S)).shape == (2, K, S, S)
