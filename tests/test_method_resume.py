"""In-stage resume of the training-based criteria (Slimming, CAP, SIRFP, ACoSP): a run interrupted
right after an in-stage checkpoint and resumed from it ends bitwise where an uninterrupted run ends,
including the method's own state (CAP importances, SIRFP redundancy EMAs, ACoSP logits).

The interruption is an exception raised at ``engine.train.fault_point`` (the place where
``SEGPRUNE_KILL_AT`` SIGKILLs a real run, see test_resume.py), so the test stays in-process."""
import inspect
import warnings

import pytest
import torch

import segprune.engine.train as train_mod
from segprune.checkpoint import CheckpointError, load_state_dict
from segprune.engine.log import StageLog
from segprune.engine.resume import StageCheckpoint
from segprune.methods import METHODS, build_method


# the toy network and units of the ACoSP tests: conv1(3->12)-bn1 -> conv2(12->10)-bn2 -> conv3
from test_acosp import UNITS, Toy, _loader as _acosp_loader  # noqa: E402

BASE = {"epochs": 3, "lr_seg": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "max_iters_per_epoch": 3}
CFGS = {
    "slimming": {"name": "slimming", "alpha": 0.01},
    "cap": {"name": "cap", "alpha": 0.01, "options": {"ema": 0.5}},
    "sirfp": {"name": "sirfp", "options": {"ema": 0.5, "edge_weight": 0.5}},
    "acosp": {"name": "acosp", "options": {"keep_ratio": 0.5, "min_keep": 2, "end_epoch_frac": 0.5}},
}


class Interrupted(Exception):
    pass


def _loader():
    return _acosp_loader(n=6)  # 6 random 8x8 images, 3 classes, batch 2: 3 iterations per epoch


def _train(name, ckpt_path, monkeypatch, stop_at=None, cfg=None):
    """Train a fresh toy with method ``name`` (config ``cfg`` or ``CFGS[name]``); with ``stop_at``,
    interrupt after that iteration. Returns (model, method) or raises Interrupted."""
    torch.manual_seed(0)
    model, meth = Toy(), build_method({**BASE, **(cfg or CFGS[name])})
    if stop_at is not None:
        def fault(stage, it):
            if it == stop_at:
                raise Interrupted
        monkeypatch.setattr(train_mod, "fault_point", fault)
    try:
        meth.train(model, UNITS, _loader(), None, 255, StageLog("sparsity", quiet=True),
                   ckpt=StageCheckpoint(ckpt_path, every=2))
    finally:
        monkeypatch.undo()
    return model, meth


def _method_state(name, meth, model):
    if name == "cap":
        return dict(meth.last_guidance)
    if name == "sirfp":
        return meth.scores(model, UNITS)
    if name == "acosp":
        return dict(meth.logits)
    return {}


@pytest.mark.parametrize("stop_at", [5, 6])  # mid-epoch (checkpoint at 4); right at an epoch's end (6 = 2 x 3)
@pytest.mark.parametrize("name", sorted(CFGS))
def test_interrupted_and_resumed_equals_uninterrupted(name, stop_at, tmp_path, monkeypatch):
    straight, m_straight = _train(name, tmp_path / "a" / "partial.safetensors", monkeypatch)
    part = tmp_path / "b" / "partial.safetensors"
    with pytest.raises(Interrupted):
        _train(name, part, monkeypatch, stop_at=stop_at)   # 9 iterations, 3 per epoch; checkpoints every 2
    assert part.is_file()
    resumed, m_resumed = _train(name, part, monkeypatch)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = _method_state(name, m_straight, straight), _method_state(name, m_resumed, resumed)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), (name, k)
    if name != "slimming":
        assert sa, "the method state compared must not be empty"


def test_a_checkpoint_without_the_method_state_is_refused_by_name(tmp_path, monkeypatch):
    """SIRFP resumed with the edge term on from a checkpoint written with it off: refused, naming
    the file and the BatchNorm, instead of continuing with half the statistics."""
    part = tmp_path / "partial.safetensors"
    off = {"name": "sirfp", "options": {"ema": 0.5, "edge_weight": 0.0}}
    with pytest.raises(Interrupted):
        _train("sirfp", part, monkeypatch, stop_at=3, cfg=off)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: no SIRFP statistics for bn1 \(edge\)"):
        _train("sirfp", part, monkeypatch)


def test_every_training_criterion_accepts_an_in_stage_checkpoint():
    """The pipeline passes ``ckpt`` only to methods whose ``train`` takes it: all training ones must."""
    for name, cls in METHODS.items():
        if "train" in vars(cls) or any("train" in vars(b) for b in cls.__mro__[1:-1] if b.__name__ != "PruningMethod"):
            assert "ckpt" in inspect.signature(cls.train).parameters, name


@pytest.mark.parametrize("name", ["sirfp", "acosp"])
def test_prune_after_a_restart_uses_what_training_learned(name, tmp_path):
    """A run stopped after its sparsity stage and continued in a new process keeps the same channels
    as an uninterrupted one: SIRFP's training EMAs and ACoSP's logits are stored with the stage
    (``method_state.safetensors``) instead of being re-estimated."""
    import copy
    import json

    from conftest import TINY
    from segprune.config import DEFAULTS, merge
    from segprune.pipeline import Pipeline

    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    cfg["method"]["name"] = name
    cfg["method"]["options"] = {"keep_ratio": 0.3, "min_keep": 1} if name == "acosp" else {"edge_weight": 0.2}
    cfg["train"]["seg"]["epochs"] = 1
    cfg["prune"]["keep_ratio"] = 0.3
    cfg["prune"]["round_to"] = 4  # ACoSP: rounding adds masked channels by score (logits, not folded γ = 0)
    straight, split = tmp_path / "straight", tmp_path / "split"
    Pipeline(copy.deepcopy(cfg), straight, quiet=True).run(stop_after="prune")
    Pipeline(copy.deepcopy(cfg), split, quiet=True).run(stop_after="sparsity")
    assert (split / "stages/03_sparsity/method_state.safetensors").is_file()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pipeline(copy.deepcopy(cfg), split, quiet=True).run(stop_after="prune")
    assert not [w for w in caught if "calibration" in str(w.message)]
    a = json.loads((straight / "stages/04_prune/arch.json").read_text())["widths"]
    b = json.loads((split / "stages/04_prune/arch.json").read_text())["widths"]
    assert a == b
    wa = load_state_dict(straight / "stages/04_prune/model.safetensors")
    wb = load_state_dict(split / "stages/04_prune/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same channels, not only as many


@pytest.mark.parametrize("header,needle", [
    ('{"it": 4, "epoch": 1', "damaged in-stage checkpoint header"),
    ('[1, 2]', "header is list, not an object"),
    ('{"it": 4}', "lacks epoch, batch, sums"),
])
def test_damaged_partial_checkpoint_header_is_refused_by_name(tmp_path, monkeypatch, header, needle):
    """A partial.safetensors whose JSON header is cut, of the wrong type or missing keys: a
    CheckpointError naming the file (before: a JSONDecodeError or KeyError traceback)."""
    from segprune.checkpoint import save_state_dict
    part = tmp_path / "partial.safetensors"
    save_state_dict(part, {"loader.gen": torch.zeros(3, dtype=torch.uint8)}, {"segprune_partial": header})
    with pytest.raises(CheckpointError, match=needle) as e:
        _train("slimming", part, monkeypatch)
    assert str(part) in str(e.value)
