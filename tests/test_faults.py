"""Faults met in the middle of a stage: a non-finite loss in MTP's and ACoSP's own loops, and a
corrupt image met during training (data validation off)."""
import copy
import json

import pytest
import torch
import yaml

import segprune.methods.acosp as acosp_mod
from segprune.cli import main
from segprune.engine.log import StageLog
from segprune.engine.resume import StageCheckpoint
from segprune.engine.train import NonFiniteLossError
from segprune.methods import build_method
from test_data import make_camvid
from test_method_resume import UNITS, Toy, _loader
from test_mtp import _batches, _setup
from conftest import TINY


def test_mtp_non_finite_losses_name_the_equation_and_step():
    _, _, mtp = _setup()
    xc, yc, xs, ys = _batches(1)[0]
    mtp.step_w1(xc, yc, 0.05)
    with pytest.raises(NonFiniteLossError, match=r"sparsity \(W1, Eq\. 7\).*at step"):
        mtp.step_w1(xc * float("nan"), yc, 0.05)
    with pytest.raises(NonFiniteLossError, match=r"sparsity \(W2/W3, Eqs\. 8-9\).*at step"):
        mtp.step_w23(xs * float("inf"), ys, 0.05, 255)


def test_acosp_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real, calls = acosp_mod.seg_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss   # iteration index 3

    monkeypatch.setattr(acosp_mod, "seg_loss", poisoned)
    part = tmp_path / "partial.safetensors"
    meth = build_method({"name": "acosp", "epochs": 3, "lr_seg": 0.05, "max_iters_per_epoch": 3,
                         "options": {"keep_ratio": 0.5, "min_keep": 2}})
    torch.manual_seed(0)
    with pytest.raises(NonFiniteLossError, match=r"stage sparsity: loss became nan at step 3"):
        meth.train(Toy(), UNITS, _loader(), None, 255, StageLog("sparsity", quiet=True),
                   ckpt=StageCheckpoint(part, every=2))
    _, meta = StageCheckpoint(part, every=2).load()
    assert meta["it"] == 2  # the checkpoint after iteration 2 survives the failure at iteration 3


def test_corrupt_image_met_during_training_stops_cleanly(tmp_path, capsys):
    """With ``data.seg.validate: false`` nothing decodes the images up front; the corrupt one is met
    by the segmentation training loader: exit 2 naming the file, earlier stages kept."""
    root = make_camvid(tmp_path / "camvid", n=8, h=16, w=16)
    bad = sorted((root / "train").glob("*.jpg"))[5]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    cfg = copy.deepcopy(TINY)
    cfg["data"]["seg"] = {"name": "camvid", "root": str(root), "input_size": [16, 16], "crop_size": [16, 16],
                          "train_split": "train", "eval_split": "train", "batch_size": 4, "eval_batch_size": 4,
                          "validate": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and bad.name in err
    assert (out / "stages/01_pretrain_cls/done.json").is_file()
    assert not (out / "stages/02_train_seg/done.json").exists()
    assert json.loads((out / "stages/01_pretrain_cls/done.json").read_text())  # intact JSON
