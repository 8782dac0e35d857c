"""The ℓ1 machinery shared by the γ methods (segprune/methods/sparsity.py) and MTP's μ schedule (issue 15).

* the proximal ℓ1 step is ISTA on a momentum-free, decay-free γ group: where the data gradient is
  zero, γ follows its closed form and exact zeros stay zero, whatever momentum the rest of the
  network uses;
* the growing schedule drives the channels that the budget removes (per part for Ind, overall for
  Uni) below ε by the end of sparsity training, for Slimming, CAP and MTP (both of MTP's copies);
* MTP's ``rho: auto`` brings ||W1 - W3|| / ||W3|| under a bound on a toy.
"""
import copy

import pytest
import torch
from torch.utils.data import TensorDataset

import segprune.engine.train as train_mod
from segprune.algorithm import Budget, choose_widths, sparsify
from segprune.config import DEFAULTS
from segprune.engine.log import StageLog
from segprune.engine.resume import StageCheckpoint
from segprune.engine.train import make_loader, poly_lr
from segprune.methods import build_method
from segprune.methods.base import training_budget
from segprune.methods.mtp import MTP, auto_rho, run_mtp, spearman
from segprune.methods.sparsity import L1Sparsity, sgd_param_groups, soft_threshold_
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units

from test_acosp import UNITS, Toy  # conv1(3->12)-bn1 -> conv2(12->10)-bn2 -> conv3(10->3)


# ---- 1. the proximal step ----------------------------------------------------------------------

def _pulse_loader(n_batches, bs=2, size=8):
    """Batch 0: label 1 everywhere (a real gradient, which fills any momentum buffer); later batches:
    label 0, which the head's bias of 1e4 predicts with probability exactly 1 in float32, so every
    gradient is exactly zero from step 1 on (a zero-loss toy). Ordered, not shuffled."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * bs, 3, size, size, generator=g)
    y = torch.zeros(n_batches * bs, size, size, dtype=torch.long)
    y[:bs] = 1
    return make_loader(TensorDataset(x, y), bs, False, 0)


def _pulse_run(mode, alpha=0.4, lr=0.1, steps=12, schedule="constant"):
    torch.manual_seed(0)
    m = Toy()
    with torch.no_grad():
        m.conv3.bias.copy_(torch.tensor([1e4, 0.0, 0.0]))
        m.bn1.weight.copy_(torch.linspace(-0.3, 0.35, 12))
    seen = []
    m.bn1.register_forward_pre_hook(lambda mod, inp: seen.append(mod.weight.detach().clone()))
    meth = build_method({"name": "slimming", "epochs": 1, "lr_seg": lr, "momentum": 0.9, "weight_decay": 1e-4,
                         "max_iters_per_epoch": None, "alpha": alpha, "l1_mode": mode, "l1_schedule": schedule})
    meth.train(m, UNITS, _pulse_loader(steps), None, 255, StageLog("t", quiet=True))
    seen.append(m.bn1.weight.detach().clone())
    return seen, [poly_lr(lr, t, steps) for t in range(steps)]


def test_proximal_step_follows_the_closed_form_and_zeros_stay_zero():
    """γ_t = sign(γ_1) max(|γ_1| - Σ_{1<=τ<t} lr_τ α, 0) exactly from step 1 on, although the SGD
    momentum (0.9) and weight decay (1e-4) of the other parameters are on and step 0 had a real
    gradient: the penalised γ have neither, and the threshold is applied after their plain step."""
    alpha = 0.4
    traj, lrs = _pulse_run("proximal", alpha)
    g1 = traj[1]
    assert not torch.equal(traj[0], traj[1])       # step 0 moved γ (the pulse)
    for t in range(2, len(traj)):
        shrink = alpha * sum(lrs[1:t])
        want = torch.sign(g1) * torch.clamp(g1.abs() - shrink, min=0.0)
        torch.testing.assert_close(traj[t], want, rtol=0, atol=1e-6)
    # some channels reached exactly zero midway and never left it (no momentum to revive them)
    first_zero = {c: next((t for t in range(len(traj)) if traj[t][c] == 0), None) for c in range(12)}
    hit = [c for c, t in first_zero.items() if t is not None and t < len(traj) - 3]
    assert len(hit) >= 3, first_zero
    for c in hit:
        assert all(traj[t][c] == 0 for t in range(first_zero[c], len(traj)))
    assert (traj[-1] != 0).any()                   # ... and the large ones are still alive


def test_subgradient_never_gives_exact_zeros():
    """The comparison that chose the proximal step: the sub-gradient with momentum leaves every γ
    that the proximal step sets to zero oscillating around it instead."""
    prox, _ = _pulse_run("proximal")
    sub, _ = _pulse_run("subgradient")
    zero = prox[-1] == 0
    assert zero.sum() >= 3
    assert not (sub[-1][zero] == 0).any()


def test_penalised_gammas_get_their_own_momentum_free_group():
    a, b, c = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    groups = sgd_param_groups([a, b, c], [b], 0.9, 1e-4, "proximal")
    assert [len(g["params"]) for g in groups] == [2, 1]
    assert groups[1]["params"][0] is b and groups[1]["momentum"] == 0.0 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["momentum"] == 0.9 and groups[0]["weight_decay"] == 1e-4
    assert len(sgd_param_groups([a, b, c], [b], 0.9, 1e-4, "subgradient")) == 1
    g = torch.tensor([0.5, -0.05, 0.0, -1.0])
    soft_threshold_([g], [torch.tensor([0.1, 0.1, 0.1, 2.0])])
    torch.testing.assert_close(g, torch.tensor([0.4, 0.0, 0.0, 0.0]))


def test_mtp_puts_its_penalised_gammas_in_momentum_free_groups():
    m, units = _deeplab()
    mtp = MTP(m, units, {**_MTP, "l1_schedule": "growing"}, total_steps=8, budget=Budget(keep_ratio=0.5),
              select=lambda s, p, mode, mc: build_method({"name": "mtp"}).select_from_scores(s, units, p, mode, mc))
    for opt, pen in ((mtp.opt1, mtp.gamma1), (mtp.opt23, mtp.gamma2 + mtp.gamma3)):
        ids = {id(p) for p in pen}
        for g in opt.param_groups:
            inside = [id(p) in ids for p in g["params"]]
            assert all(inside) or not any(inside)
            if all(inside):
                assert g["momentum"] == 0.0 and g["weight_decay"] == 0.0
        assert sum(len(g["params"]) for g in opt.param_groups if g["momentum"] == 0.0) == len(pen)


# ---- 2. the growing schedule ---------------------------------------------------------------------

_MTP = {"lam": 1.0, "alpha1": 1e-3, "alpha2": 1e-3, "mu0": 0.05, "rho": "auto", "mu_max": 8.0, "lr_seg": 0.05,
        "lr_cls": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "l1_mode": "proximal", "keep_copy": "w3",
        "update_every": 1, "l1_eps": 1e-3, "l1_ramp": 0.5, "epochs": 4, "max_iters_per_epoch": None}


def _deeplab(seed=0):
    torch.manual_seed(seed)
    m = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 8}, 3, 4)
    return m, discover_units(m, build_graph(m, (32, 32)))


def _seg_loader(n=16, bs=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()            # labels that depend on the image
    return make_loader(TensorDataset(x, y), bs, True, seed)


def _cls_loader(n=16, bs=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return make_loader(TensorDataset(x, (x.mean((1, 2, 3)) > 0).long()), bs, True, seed)


def _removed_gammas(model, units, kept, source=None):
    """part -> |γ| of every BN channel the selection removes (source: BN name -> module to read)."""
    mods = dict(model.named_modules())
    out = {}
    for u in units:
        mask = torch.ones(u.channels, dtype=torch.bool)
        mask[kept[u.name]] = False
        for b in u.bns:
            mod = (source or {}).get(b) or mods[b]
            out.setdefault(u.part, []).append(mod.weight.detach().abs()[mask])
    return {p: torch.cat(v) for p, v in out.items()}


@pytest.mark.parametrize("name,mode", [("slimming", "ind"), ("slimming", "uni"), ("cap", "ind")])
def test_growing_schedule_zeroes_what_the_budget_removes(name, mode):
    """After sparsity training for keep 0.5, the channels that the prune step removes (each part for
    Ind, all units for Uni) have |γ| <= ε = l1_eps × mean |γ| before training; the constant schedule
    with the same α leaves them far above (the test can fail)."""
    res = {}
    for schedule in ("growing", "constant"):
        m, units = _deeplab()
        gbar = float(torch.cat([dict(m.named_modules())[b].weight.detach().abs() for u in units for b in u.bns]).mean())
        meth = build_method({"name": name, "epochs": 4, "lr_seg": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
                             "alpha": 1e-3, "l1_schedule": schedule, "l1_eps": 1e-3})
        budget = Budget(keep_ratio=0.5, threshold_mode=mode, min_channels=1)
        info = sparsify(meth, m, units, _seg_loader(), None, 255, StageLog("t", quiet=True), budget, (32, 32))
        kept, _ = choose_widths(meth, m, units, budget, (32, 32))
        removed = _removed_gammas(m, units, kept)
        n_all = sum(u.channels for u in units)
        assert sum(v.numel() for v in removed.values()) == pytest.approx(0.5 * n_all, abs=len(units))
        res[schedule] = (removed, gbar, info)
    removed, gbar, info = res["growing"]
    for part, g in removed.items():
        assert float(g.max()) <= 1e-3 * gbar, (part, float(g.max()))
    assert info["l1"]["l1_schedule"] == "growing" and info["l1"]["groups"]["seg"]["removed_below_eps"] == 1.0
    removed_c, _, info_c = res["constant"]
    assert info_c["l1"]["l1_schedule"] == "constant"
    assert all(float(g.max()) > 100 * 1e-3 * gbar for g in removed_c.values())


def test_growing_schedule_under_a_flops_target():
    """FLOPs target: the keep ratio is estimated during training by the FLOPs search on the current
    scores; the channels that choose_widths then removes at the target are at zero."""
    m, units = _deeplab()
    meth = build_method({"name": "slimming", "epochs": 2, "lr_seg": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
                         "alpha": 1e-3, "l1_schedule": "growing"}, input_size=(32, 32))
    budget = Budget(keep_ratio=0.5, target_flops_ratio=0.5, flops_tolerance=0.02, min_channels=1)
    info = sparsify(meth, m, units, _seg_loader(), None, 255, StageLog("t", quiet=True), budget, (32, 32))
    assert info["l1"]["keep_ratio"] is not None and info["l1"]["keep_ratio"] != 0.5
    kept, fl = choose_widths(meth, m, units, budget, (32, 32))
    assert abs(fl["flops_ratio_achieved"] - 0.5) <= 0.02
    g = torch.cat(list(_removed_gammas(m, units, kept).values()))
    assert g.numel() > 0 and float(g.max()) == 0.0


def test_growing_schedule_zeroes_both_mtp_copies_and_couples_them():
    """MTP, growing schedule: the channels removed by MTP's scores (γ1 of W1 for the backbone, γ2 for the
    decoder) are zero in W1 *and* in W3, the copy that is pruned; rho auto ends at mu_max."""
    m, units = _deeplab()
    meth = build_method({"name": "mtp", **_MTP, "l1_schedule": "growing"}, input_size=(32, 32))
    budget = Budget(keep_ratio=0.5, min_channels=1)
    info = sparsify(meth, m, units, _seg_loader(), _cls_loader(), 255, StageLog("t", quiet=True), budget, (32, 32))
    kept, _ = choose_widths(meth, m, units, budget, (32, 32))
    w3 = _removed_gammas(m, units, kept)
    assert float(torch.cat(list(w3.values())).max()) == 0.0      # W3 (backbone) and W2 (decoder) as pruned
    assert info["mu"] == pytest.approx(_MTP["mu_max"])
    assert all(g["removed_below_eps"] == 1.0 for g in info["l1"]["groups"].values())
    assert info["spearman_gamma13"] > 0.9


def test_constant_schedule_without_a_budget():
    """A γ method trained without a budget (outside the core) keeps the papers' constant α."""
    m, units = _deeplab()
    meth = build_method({"name": "slimming", "epochs": 1, "lr_seg": 0.05, "alpha": 1e-3, "l1_schedule": "growing"})
    info = meth.train(m, units, _seg_loader(), None, 255, StageLog("t", quiet=True))
    assert info["l1"]["l1_schedule"] == "constant" and info["l1"]["l1_schedule_requested"] == "growing"


def test_sparsity_stage_fingerprint_includes_the_budget():
    cfg = copy.deepcopy(DEFAULTS)
    for name in ("mtp", "slimming", "cap"):
        cfg["method"]["name"] = name
        # round_to 1 (no rounding) is left out, as in configs written before round_to existed
        assert training_budget(cfg) == {"threshold_mode": "ind", "min_channels": 4, "keep_ratio": 0.5}
        assert training_budget({**cfg, "prune": {**cfg["prune"], "round_to": 8}})["round_to"] == 8
        cfg["method"]["l1_schedule"] = "constant"
        assert training_budget(cfg) is None
        cfg["method"]["l1_schedule"] = "growing"
    cfg["method"]["name"] = "uniform"
    assert training_budget(cfg) is None
    from segprune.pipeline import stage_fingerprints
    a = copy.deepcopy(DEFAULTS)
    b = copy.deepcopy(a)
    b["prune"]["keep_ratio"] = 0.3
    fa, fb = stage_fingerprints(a), stage_fingerprints(b)
    assert fa["train_seg"] == fb["train_seg"] and fa["sparsity"] != fb["sparsity"]


class _Stop(Exception):
    pass


def test_growing_schedule_resumes_bitwise(tmp_path, monkeypatch):
    """Interrupted after an in-stage checkpoint and resumed: the same γ, λ and planned removal."""
    def run(path, stop_at=None):
        m, units = _deeplab()
        meth = build_method({"name": "slimming", "epochs": 2, "lr_seg": 0.05, "alpha": 1e-3,
                             "l1_schedule": "growing"})
        if stop_at is not None:
            def fault(stage, it):
                if it == stop_at:
                    raise _Stop
            monkeypatch.setattr(train_mod, "fault_point", fault)
        try:
            info = meth.train(m, units, _seg_loader(), None, 255, StageLog("t", quiet=True),
                              ckpt=StageCheckpoint(path, every=3), budget=Budget(keep_ratio=0.5, min_channels=1))
        finally:
            monkeypatch.undo()
        return m, info
    a, ia = run(tmp_path / "a" / "partial.safetensors")
    with pytest.raises(_Stop):
        run(tmp_path / "b" / "partial.safetensors", stop_at=4)
    b, ib = run(tmp_path / "b" / "partial.safetensors")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert ia["l1"] == ib["l1"]


# ---- 3. MTP's μ schedule -------------------------------------------------------------------------

def _mtp_run(rho, mu_max, steps=40, update_every=2, lr=0.01):
    m, units = _deeplab()
    cfg = {**_MTP, "rho": rho, "mu_max": mu_max, "update_every": update_every, "l1_schedule": "constant",
           "epochs": steps // 4, "lr_seg": lr, "lr_cls": lr}
    return run_mtp(m, units, _cls_loader(), _seg_loader(), cfg, 255, StageLog("t", quiet=True))


def test_auto_rho_reaches_mu_max_at_half_and_w1_meets_w3():
    """rho: auto -> μ = μ_max from half of the updates on; with momentum 0.9 on the data gradient,
    ||W1 - W3|| / ||W3|| < 0.02 at the end on the toy (measured 0.011), while a fixed ρ of 1.05
    (the old default; μ ends at 0.13) leaves the copies > 10x further apart (measured 0.41)."""
    assert auto_rho(0.05, 8.0, 24, 2) == pytest.approx((8.0 / 0.05) ** (1 / 12))
    assert auto_rho(0.05, 0.05, 24, 2) == 1.0 and auto_rho(0.05, 8.0, 1, 2) == 1.0
    strong = _mtp_run("auto", 20.0)
    assert strong.mu == pytest.approx(20.0)
    assert strong.rho == pytest.approx(auto_rho(0.05, 20.0, 20, 2))
    weak = _mtp_run(1.05, 20.0)
    assert weak.mu < 0.2
    gs, gw = strong.agreement(), weak.agreement()
    assert gs["gap_rel"] < 0.02, gs
    assert gw["gap_rel"] > 10 * gs["gap_rel"], (gw, gs)
    assert gs["spearman_gamma13"] > 0.95


def test_coupling_step_is_the_exact_proximal_step():
    """couple_ returns the minimiser of 1/(2 lr)||V - W||² + μ/2 ||V - W3||² + <E, V> (Eq. 7's coupling
    terms): its gradient vanishes there; for W3 (Eq. 9) the sign of E flips."""
    m, units = _deeplab()
    mtp = MTP(m, units, {**_MTP, "rho": 1.5})
    mtp.mu, lr = 3.0, 0.2
    with torch.no_grad():
        for p, e in zip(mtp.p1, mtp.E):
            p.add_(0.1 * torch.randn_like(p))
            e.normal_()
    for mine, other, sign in ((mtp.p1, mtp.p3, 1.0), (mtp.p3, mtp.p1, -1.0)):
        w0 = [p.detach().clone() for p in mine]
        mtp.couple_(mine, other, lr, sign)
        for v, w, o, e in zip(mine, w0, other, mtp.E):
            grad = (v - w) / lr + mtp.mu * (v - o) + sign * e
            torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-4, rtol=0)


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    a = torch.tensor([0.0, 0.0, 0.3, 0.1, 0.9, 0.0, 0.5])
    b = torch.tensor([0.1, 0.0, 0.2, 0.2, 0.8, 0.0, 0.9])
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0])


def test_l1_schedule_state_round_trip():
    p = torch.nn.Parameter(torch.rand(6))
    from segprune.methods.sparsity import GammaGroup, PenalisedGamma
    from segprune.pruning.groups import PruneUnit
    u = [PruneUnit("c", "backbone", ["c"], ["b"], 6)]

    def mk():
        return L1Sparsity([GammaGroup("seg", 1.0, [PenalisedGamma(p, "b", "c", 0.0, "seg")])], "proximal", "growing", 10,
                          budget=Budget(keep_ratio=0.5), units=u, scores=lambda: {"c": p.detach().abs()},
                          select=lambda s, q, mode, mc: {"c": torch.argsort(s["c"], descending=True)[:3].sort().values})
    a = mk()
    for it in range(4):
        a.update(it)
    b = mk()
    b.load_state_tensors(a.state_tensors(), "x")
    assert b.lam == a.lam and b.keep_ratio == a.keep_ratio and b.started
    assert all(torch.equal(b.removal[k], a.removal[k]) for k in a.removal)
    torch.testing.assert_close(b.weights("seg")[0], a.weights("seg")[0])


def test_config_checks_of_the_shared_keys():
    from segprune.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="l1_schedule='growing'.*needs method.l1_mode=proximal"):
        load_config(None, ["method.l1_mode=subgradient"])
    load_config(None, ["method.l1_mode=subgradient", "method.l1_schedule=constant"])
    with pytest.raises(ConfigError, match=r"(?s)l1_schedule='fast'.*l1_eps=0.*l1_ramp=1.5"):
        load_config(None, ["method.l1_schedule=fast", "method.l1_eps=0", "method.l1_ramp=1.5"])
    assert load_config(None)["method"]["rho"] == "auto"
    with pytest.raises(ConfigError, match="method.rho='fast'"):
        load_config(None, ["method.rho=fast"])
