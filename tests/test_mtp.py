"""MTP's augmented Lagrangian updates (Eqs. 7-10) on a toy DeepLabv3."""
import pytest
import torch

from segprune.methods.mtp import MTP, l1_prox_, l1_subgradient_
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units

CFG = {"lam": 1.0, "alpha1": 1e-3, "alpha2": 1e-3, "mu0": 0.5, "rho": 1.5, "mu_max": 4.0, "lr_seg": 0.05,
       "lr_cls": 0.05, "momentum": 0.0, "weight_decay": 0.0, "l1_mode": "proximal", "keep_copy": "w3"}


def _setup(**over):
    torch.manual_seed(0)
    m = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 8}, 3, 4)
    units = discover_units(m, build_graph(m, (32, 32)))
    return m, units, MTP(m, units, {**CFG, **over})


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 4, (4,), generator=g),
             torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4, 32, 32), generator=g)) for _ in range(n)]


def test_multiplier_update_follows_eq10():
    m, units, mtp = _setup()
    with torch.no_grad():
        for p in mtp.p1:
            p.add_(0.01 * torch.randn_like(p))
    for e in mtp.E:
        e.normal_()
    E0 = [e.clone() for e in mtp.E]
    diff = [(a - b).detach().clone() for a, b in zip(mtp.p1, mtp.p3)]
    mu0 = mtp.mu
    mtp.update_multipliers()
    for e_new, e_old, d in zip(mtp.E, E0, diff):
        torch.testing.assert_close(e_new, e_old + mu0 * d)
    assert mtp.mu == pytest.approx(mu0 * 1.5)
    for _ in range(10):
        mtp.update_multipliers()
    assert mtp.mu == pytest.approx(4.0)  # capped at mu_max


def test_coupling_gradient_matches_autograd_of_eq6():
    m, units, mtp = _setup()
    with torch.no_grad():
        for p, e in zip(mtp.p1, mtp.E):
            p.add_(0.1 * torch.randn_like(p))
            e.normal_()
    w1 = [p.detach().clone().requires_grad_() for p in mtp.p1]
    w3 = [p.detach().clone().requires_grad_() for p in mtp.p3]
    lag = sum((e * (a - b)).sum() + mtp.mu / 2 * (a - b).pow(2).sum() for e, a, b in zip(mtp.E, w1, w3))
    lag.backward()
    got = mtp.coupling_grad()
    for g, a, b in zip(got, w1, w3):
        torch.testing.assert_close(g, a.grad)       # ∂/∂W1 (Eq. 7)
        torch.testing.assert_close(-g, b.grad)      # ∂/∂W3 (Eq. 9)


def _gap_after(steps, **over):
    m, units, mtp = _setup(**over)
    for i, (x1, y1, x2, y2) in enumerate(_batches(steps)):
        mtp.step_w1(x1, y1, CFG["lr_cls"])
        mtp.step_w23(x2, y2, CFG["lr_seg"], 255)
        mtp.update_multipliers()
    return mtp.gap(), mtp


def test_coupling_pulls_w1_and_w3_together_as_mu_grows():
    weak, _ = _gap_after(12, mu0=1e-4, rho=1.0001, mu_max=1e-3)
    strong, mtp = _gap_after(12, mu0=0.5, rho=1.5, mu_max=15.0)
    assert weak > 0
    assert strong < 0.5 * weak, (strong, weak)
    assert mtp.mu == pytest.approx(15.0)


def test_gamma_sparsity_only_on_prunable_units_and_scores_from_w1():
    m, units, mtp = _setup(alpha1=5.0, alpha2=5.0)  # huge ℓ1: every prunable γ hits exactly 0
    x1, y1, x2, y2 = _batches(1)[0]
    mtp.step_w1(x1, y1, 0.5)
    mtp.step_w23(x2, y2, 0.5, 255)
    assert mtp.sparsity()["gamma1_zero"] == 1.0 and mtp.sparsity()["gamma2_zero"] == 1.0
    assert float(mtp.w1.bn1.weight.detach().abs().min()) > 0  # stem BN is residual-coupled: not penalised
    src = mtp.score_sources()
    assert all(mod is dict(mtp.w1.named_modules())[name[len("backbone."):]] for name, mod in src.items())


def test_finalize_copies_fc_and_optionally_w1():
    m, units, mtp = _setup(keep_copy="w1")
    with torch.no_grad():
        for p in mtp.w1.parameters():
            p.add_(1.0)
    mtp.finalize()
    torch.testing.assert_close(m.backbone.fc.weight, mtp.w1.fc.weight)
    torch.testing.assert_close(m.backbone.layer1[0].conv1.weight, mtp.w1.layer1[0].conv1.weight)


def test_l1_steps():
    g = torch.tensor([0.5, -0.05, 0.02, -1.0])
    l1_prox_([g], 0.1)
    torch.testing.assert_close(g, torch.tensor([0.4, 0.0, 0.0, -0.9]))
    p = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
    p.grad = torch.zeros(2)
    l1_subgradient_([p], 0.01)
    torch.testing.assert_close(p.grad, torch.tensor([0.01, -0.01]))


def test_rho_must_exceed_one():
    with pytest.raises(ValueError, match="rho"):
        _setup(rho=1.0)


def test_cls_weight_zero_switches_the_classification_gradient_off():
    # W1 = W3 at the start, E = 0, no ℓ1, no decay: with l_cls off nothing moves W1's parameters;
    # with the paper's weight 1 the classification step does, and the reported l_cls is the same
    xc, yc, _, _ = _batches(1)[0]
    moved, losses = {}, {}
    for w in (0.0, 1.0):
        m, units, mtp = _setup(cls_weight=w, alpha1=0.0, alpha2=0.0)
        before = [p.detach().clone() for p in mtp.w1.parameters()]
        losses[w] = mtp.step_w1(xc, yc, 0.05)
        moved[w] = max((p.detach() - b).abs().max().item() for p, b in zip(mtp.w1.parameters(), before))
    assert moved[0.0] < 1e-6  # the proximal coupling step of W1 = W3 rounds at float32's last bit
    assert moved[1.0] > 1e-4
    assert losses[0.0] == pytest.approx(losses[1.0], rel=1e-6)


def test_cls_weight_enters_the_fingerprint_only_away_from_its_default():
    import copy
    from segprune.config import ConfigError, DEFAULTS, load_config, merge
    from segprune.pipeline import stage_fingerprints
    cfg = merge(DEFAULTS, {"method": {"name": "mtp"}})
    legacy = copy.deepcopy(cfg)
    del legacy["method"]["cls_weight"]  # a run folder made before the key existed
    assert stage_fingerprints(legacy) == stage_fingerprints(cfg)
    cfg["method"]["cls_weight"] = 0.0
    assert stage_fingerprints(cfg)["sparsity"] != stage_fingerprints(legacy)["sparsity"]
    assert stage_fingerprints(cfg)["train_seg"] == stage_fingerprints(legacy)["train_seg"]  # the baseline is shared
    with pytest.raises(ConfigError, match="method.cls_weight=-1"):
        load_config(None, ["method.cls_weight=-1"])
