"""prune.round_to: pruned widths rounded to hardware-friendly multiples (issue 6).

Hand-checkable counts, the channel choice by score, and the pipeline (channel ratio and FLOPs
target) on the tiny synthetic setting; run with OMP_NUM_THREADS=1.
"""
import copy
import json

import pytest
import torch

from conftest import TINY
from segprune.config import ConfigError, DEFAULTS, merge, validate
from segprune.pipeline import Pipeline, stage_fingerprints
from segprune.pruning import round_kept, rounded_count


@pytest.mark.parametrize("kept,channels,multiple,want", [
    (5, 32, 8, 8),     # 0.625 multiples -> 1
    (11, 32, 8, 8),    # 1.375 -> 1
    (12, 32, 8, 16),   # 1.5 -> 2 (halves round up)
    (3, 32, 8, 8),     # never below one multiple
    (30, 30, 8, 30),   # 3.75 -> 32 > C: capped at the layer's width
    (3, 4, 8, 4),      # a layer narrower than the multiple keeps all its channels
    (7, 32, 1, 7),     # 1 = off
])
def test_rounded_count(kept, channels, multiple, want):
    assert rounded_count(kept, channels, multiple) == want


def test_rounded_count_rejects_bad_values():
    with pytest.raises(ValueError, match="round_to"):
        rounded_count(3, 8, 0)
    with pytest.raises(ValueError, match="1..8"):
        rounded_count(9, 8, 4)


def test_round_kept_adds_best_and_drops_worst_by_score():
    s = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2, 0.6, 0.05, 0.3, 0.4, 0.5])
    # 3 kept of 10, multiple 4 -> 4: add the best dropped channel (index 5, score 0.6)
    up = round_kept({"u": torch.tensor([0, 2, 3])}, {"u": s}, 4)["u"]
    assert up.tolist() == [0, 2, 3, 5]
    # 6 kept, multiple 4 -> 8 (1.5 rounds up): the two best dropped ones (8: 0.4, 7: 0.3) join
    six = torch.tensor([0, 2, 3, 5, 9, 4])
    assert round_kept({"u": six.sort().values}, {"u": s}, 4)["u"].tolist() == [0, 2, 3, 4, 5, 7, 8, 9]
    # 5 kept (1.25 multiples) -> 4: the worst kept one (index 4, 0.2) goes, even though the criterion chose it
    down = round_kept({"u": torch.tensor([0, 2, 3, 4, 5])}, {"u": s}, 4)["u"]
    assert down.tolist() == [0, 2, 3, 5]
    same = torch.tensor([0, 1, 2, 3])
    assert round_kept({"u": same}, {"u": s}, 4)["u"] is same
    with pytest.raises(ValueError, match="no scores"):
        round_kept({"v": same}, {"u": s}, 4)


def test_config_validates_round_to():
    for bad in (0, 2.5, "8", True):
        cfg = merge(DEFAULTS, {"prune": {"round_to": bad}})
        assert any("prune.round_to" in b for b in validate(cfg, raise_error=False)), bad
    assert not validate(merge(DEFAULTS, {"prune": {"round_to": 16}}), raise_error=False)


def test_round_to_one_keeps_old_fingerprints():
    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    old = copy.deepcopy(cfg)
    del old["prune"]["round_to"]
    assert stage_fingerprints(cfg) == stage_fingerprints(old)
    cfg8 = copy.deepcopy(cfg)
    cfg8["prune"]["round_to"] = 8
    a, b = stage_fingerprints(cfg), stage_fingerprints(cfg8)
    # MTP's growing ℓ1 schedule zeroes the channels of the rounded budget: rounding is a sparsity input
    assert a["sparsity"] != b["sparsity"] and a["prune"] != b["prune"]
    for c in (cfg, cfg8):  # with the paper's constant α the budget only enters at the prune stage
        c["method"]["l1_schedule"] = "constant"
    a, b = stage_fingerprints(cfg), stage_fingerprints(cfg8)
    assert a["sparsity"] == b["sparsity"] and a["prune"] != b["prune"]


def _units(run):
    return json.loads((run / "stages" / "04_prune" / "arch.json").read_text())["widths"]["units"]


@pytest.mark.parametrize("method", ["mtp", "fpgm"])
def test_pipeline_widths_are_multiples(tmp_path, method):
    base = merge(DEFAULTS, copy.deepcopy(TINY))
    base["method"]["name"] = method
    base["train"]["seg"]["epochs"] = 1
    base["prune"]["keep_ratio"] = 0.4  # 0.4 x (8, 16, 32) channels: 3, 6, 13 -- not multiples of 4
    plain = tmp_path / "plain"
    Pipeline(copy.deepcopy(base), plain, quiet=True).run(stop_after="prune")
    rounded_cfg = copy.deepcopy(base)
    rounded_cfg["prune"]["round_to"] = 4
    rounded = tmp_path / "r4"
    Pipeline(rounded_cfg, rounded, quiet=True, share=[plain]).run(stop_after="prune")
    shared = json.loads((rounded / "stages" / "03_sparsity" / "done.json").read_text()).get("shared_from")
    from segprune.methods.base import training_budget
    if training_budget(rounded_cfg) is None:  # training independent of the budget: the sparsity stage is shared
        assert shared == str(plain)
    else:  # MTP's growing ℓ1 schedule zeroes the channels the *rounded* budget removes: its own sparsity stage
        assert shared is None and training_budget(rounded_cfg)["round_to"] == 4
    u0, u4 = _units(plain), _units(rounded)
    assert any(u["kept"] % 4 for u in u0.values()), "the toy case must need rounding somewhere"
    done = json.loads((rounded / "stages" / "04_prune" / "done.json").read_text())
    assert done["round_to"] == 4
    for name, u in u4.items():
        assert u["kept"] % 4 == 0 or u["kept"] == u["channels"], name
        if shared:  # same γ as the plain run: rounding moves each width to the nearest multiple
            assert u["kept"] == rounded_count(u0[name]["kept"], u["channels"], 4), name
    if shared:
        assert done["kept_channels_before_rounding"] == sum(u["kept"] for u in u0.values())


def test_flops_target_is_met_after_rounding(tmp_path):
    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    cfg["train"]["seg"]["epochs"] = 1
    cfg["prune"].update(round_to=4, target_flops_ratio=0.6, flops_tolerance=0.03)
    out = tmp_path / "t"
    Pipeline(cfg, out, quiet=True).run(stop_after="prune")
    done = json.loads((out / "stages" / "04_prune" / "done.json").read_text())
    assert abs(done["flops_ratio_achieved"] - 0.6) <= 0.03 and done["flops_target_met"]
    assert all(u["kept"] % 4 == 0 or u["kept"] == u["channels"] for u in _units(out).values())


def test_bad_round_to_is_a_config_error(tmp_path):
    cfg = merge(DEFAULTS, copy.deepcopy(TINY))
    cfg["prune"]["round_to"] = 0
    with pytest.raises(ConfigError, match="prune.round_to"):
        Pipeline(cfg, tmp_path / "bad", quiet=True)
