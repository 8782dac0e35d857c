"""One Algorithm-1 core: the CLI pipeline and ``segprune.api.prune_model`` give the same pruning.

For every registered method and every budget (keep ratio; keep ratio with ``round_to``; FLOPs
target), the pipeline's prune stage and ``prune_model`` on the same trained baseline, with the same
loaders and seed, must keep the same channels of every unit: same widths, and bitwise the same
pruned weights (which fixes *which* channels were kept, and that the sparsity training was the same).
The pipeline runs after the first budget adopt the finished sparsity stage of the first, so the
prune stage's resume path (the method's trained state read back from the stage folder) is
compared as well.
"""
import copy

import pytest
import torch
import yaml

from conftest import TINY
from segprune.algorithm import Budget
from segprune.api import prune_model
from segprune.config import load_config
from segprune.methods.base import PruningMethod, build_method, method_config, method_names
from segprune.pipeline import Pipeline, load_run_model, model_input_size, stage_dir

BUDGETS = {
    "keep": {"keep_ratio": 0.5},
    "round8": {"keep_ratio": 0.5, "round_to": 8},
    "flops": {"target_flops_ratio": 0.6, "flops_tolerance": 0.03},
}


def _cfg(tmp, method: str, budget: str) -> dict:
    raw = copy.deepcopy(TINY)
    raw["method"] = {**raw["method"], "name": method, "max_iters_per_epoch": 2}
    if method != "mtp":  # MTP's own keys are rejected by no one, but keep the section minimal for the others
        raw["method"] = {k: v for k, v in raw["method"].items() if k not in ("alpha1", "alpha2", "mu0", "rho", "mu_max",
                                                                              "update_every")}
    raw["prune"] = {**raw["prune"], **{k: v for k, v in BUDGETS[budget].items()}}
    p = tmp / f"{method}_{budget}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_config(p)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    """The tiny config's classification pre-training and baseline, trained once and shared."""
    tmp = tmp_path_factory.mktemp("parity")
    out = tmp / "base"
    Pipeline(_cfg(tmp, "mtp", "keep"), out, quiet=True).run(stop_after="train_seg")
    return tmp, out


@pytest.mark.parametrize("method", method_names())
def test_pipeline_and_api_keep_the_same_channels(baseline_run, method):
    tmp, base = baseline_run
    shared = [base]
    for budget in BUDGETS:
        cfg = _cfg(tmp, method, budget)
        out = tmp / f"{method}_{budget}"
        pipe = Pipeline(cfg, out, quiet=True, share=shared)
        pipe.run(stop_after="prune")
        shared.append(out)  # the next budgets adopt this sparsity stage (same fingerprint, except ACoSP's)
        ref, arch = load_run_model(stage_dir(out, "prune"))

        model, _ = load_run_model(stage_dir(base, "train_seg"))
        seg_loader, cls_loader = pipe._loaders()
        pr = cfg["prune"]
        mcfg = {k: v for k, v in cfg["method"].items() if k != "name"}
        budget_kw = ({"target_flops_ratio": pr["target_flops_ratio"], "flops_tolerance": pr["flops_tolerance"]}
                     if pr["target_flops_ratio"] is not None else {"keep_ratio": pr["keep_ratio"]})
        res = prune_model(model, method, **budget_kw, round_to=pr["round_to"], threshold_mode=pr["threshold_mode"],
                          min_channels=pr["min_channels"], include_coupled=pr["prune_coupled"],
                          seg_loader=seg_loader, cls_loader=cls_loader, calib_loader=pipe._calib_loader(),
                          input_size=model_input_size(cfg), method_cfg=mcfg, seed=cfg["seed"])
        widths_pipe = {n: u["kept"] for n, u in arch["widths"]["units"].items()}
        widths_api = {n: u["kept"] for n, u in res.widths["units"].items()}
        assert widths_api == widths_pipe, f"{method} / {budget}: widths differ"
        assert any(u["kept"] < u["channels"] for u in res.widths["units"].values())  # something was pruned
        if pr["round_to"] > 1:
            assert all(k % 8 == 0 or k == u["channels"] for k, u in zip(widths_api.values(), res.widths["units"].values()))
        got, want = res.model.state_dict(), ref.state_dict()
        assert set(got) == set(want)
        diff = [k for k in want if not torch.equal(got[k], want[k])]
        assert not diff, f"{method} / {budget}: pruned tensors differ: {diff[:5]}"


def test_every_method_reads_only_declared_keys():
    """A method sees name, options and its config_keys; reading anything else raises (and a
    declared key missing from the section takes the default, not a method-local fallback)."""
    for name in method_names():
        meth = build_method({"name": name})
        for key in meth.config_keys:
            assert key in meth.cfg
        with pytest.raises(KeyError, match=f"method {name!r} reads method.not_a_key.*config_keys"):
            meth.cfg["not_a_key"]
        with pytest.raises(KeyError, match="config_keys"):
            meth.cfg.get("not_a_key", 1)
    from segprune.config import DEFAULTS
    assert build_method({"name": "slimming"}).cfg["epochs"] == DEFAULTS["method"]["epochs"]
    mtp = build_method({"name": "mtp"})
    assert method_config({**DEFAULTS["method"], "name": "mtp"}) == {  # keys added later stay out at their default
        "name": "mtp", **{k: DEFAULTS["method"][k] for k in mtp.config_keys if k not in mtp.FINGERPRINT_DEFAULTS}}


def test_method_checks_run_only_for_their_method(tmp_path):
    """MTP's lr * mu_max < 1 concerns MTP alone; its keys are free for other methods."""
    from segprune.config import ConfigError
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"method": {"name": "slimming", "mu_max": 500.0, "rho": 0.5}}))
    assert load_config(p)["method"]["name"] == "slimming"
    p.write_text(yaml.safe_dump({"method": {"name": "mtp", "mu_max": 500.0, "rho": 0.5}}))
    with pytest.raises(ConfigError, match=r"(?s)method.rho=0.5: must be > 1.*method.mu_max=500.0: lr \* mu_max"):
        load_config(p)


def test_a_ninth_method_is_one_class(tmp_path):
    """A new method registered in one place is usable by name from the config and the API."""
    from segprune.methods import base

    @base.register_method
    class LastFilterL2(PruningMethod):
        name = "test_last_filter_l2"
        config_keys = ()

        def scores(self, model, units, calib_loader=None):
            mods = dict(model.named_modules())
            return {u.name: mods[u.name].weight.detach().flatten(1).norm(dim=1) for u in units}
    try:
        assert "test_last_filter_l2" in method_names()
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({"method": {"name": "test_last_filter_l2"}}))
        assert load_config(p)["method"]["name"] == "test_last_filter_l2"
        model, _ = _tiny_model()
        res = prune_model(model, "test_last_filter_l2", keep_ratio=0.5, input_size=(32, 32))
        assert res.report["flops"]["ratio"] < 0.9
    finally:
        del base.METHODS["test_last_filter_l2"]


def _tiny_model():
    from segprune.models import build_model
    torch.manual_seed(0)
    m = build_model({**TINY["model"], "multi_grid": None, "aspp_rates": None}, 5, 4)
    return m, None


def test_budget_rejects_bad_values():
    for kw, msg in (({"keep_ratio": 1.0}, r"\(0, 1\)"), ({"keep_ratio": None, "target_flops_ratio": 1.5}, r"\(0, 1\)"),
                    ({"threshold_mode": "global"}, "'ind' or 'uni'"), ({"min_channels": 0}, ">= 1"),
                    ({"round_to": 0}, ">= 1"), ({"flops_tolerance": 0}, "> 0")):
        with pytest.raises(ValueError, match=msg):
            Budget(**kw)


def test_mtp_run_folder_of_an_earlier_version_resumes_at_the_prune_stage(baseline_run):
    """Run folders written before MTP was a PruningMethod hold its γ1 scores only in
    ``03_sparsity/scores.safetensors`` (no ``method_state.safetensors``): resuming after the sparsity
    stage reads them (``legacy_state_file``) and prunes exactly as an uninterrupted run."""
    import shutil
    tmp, base = baseline_run
    cfg = _cfg(tmp, "mtp", "keep")
    straight = tmp / "mtp_legacy_straight"
    Pipeline(cfg, straight, quiet=True, share=[base]).run(stop_after="prune")
    legacy = tmp / "mtp_legacy"
    Pipeline(cfg, legacy, quiet=True, share=[base]).run(stop_after="sparsity")
    state = stage_dir(legacy, "sparsity") / "method_state.safetensors"
    assert state.is_file()
    state.unlink()  # what an earlier segprune wrote: scores.safetensors only
    assert (stage_dir(legacy, "sparsity") / "scores.safetensors").is_file()
    Pipeline(cfg, legacy, quiet=True).run(stop_after="prune")
    a, _ = load_run_model(stage_dir(straight, "prune"))
    b, _ = load_run_model(stage_dir(legacy, "prune"))
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    # without either file MTP cannot know W1's γ: a clear error, not other widths
    shutil.rmtree(stage_dir(legacy, "prune"))
    (stage_dir(legacy, "sparsity") / "scores.safetensors").unlink()
    with pytest.raises(RuntimeError, match="MTP scores are the γ of its sparsity training"):
        Pipeline(cfg, legacy, quiet=True).run(stop_after="prune")
