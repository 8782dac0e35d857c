"""How fast does MTP's tied backbone move? A scalar toy of the coupling (session 9, issue 15).

MTP (Chen et al., Eqs. 5-10) trains two copies of the backbone, W1 on classification and W3 on
segmentation, tied by the augmented Lagrangian <E, W1 - W3> + mu/2 ||W1 - W3||^2. Once the tie is tight
the two copies are one backbone, and each iteration moves it by about the *mean* of the two copies' own
steps, so a copy's lr acts on the shared backbone at about half its value. This script shows it on
scalars with the update code of ``segprune.methods.mtp.MTP`` (as in ``step_w1``/``step_w23`` without
momentum: a data step, then ``MTP.couple_``; ``MTP.update_multipliers`` every ``every`` steps), against one copy
trained on the summed loss l_cls + l_seg by plain gradient descent.

    l_cls(w) = a/2 (w - p)^2,  l_seg(w) = b/2 (w - q)^2   (a = b = 1, p = 0, q = 10: optimum of the sum 5)

Run: ``python benchmarks/mtp_tie_toy.py``. Output: the consensus (W1 + W3)/2 after T iterations for
MTP at lr 0.02 and 0.04 (mu = 20 from the start) and single-copy descent at lr 0.01 and 0.02; MTP at
lr 0.02 tracks single-copy descent at lr 0.01 (docs/results/sparsity.md, "Demo: MTP's sparsity lr").
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from segprune.methods.mtp import MTP

A, B, P, Q = 1.0, 1.0, 0.0, 10.0


def mtp_pair(lr: float, steps: int, mu: float = 20.0, every: int = 10) -> tuple[float, float]:
    """(W1, W3) after ``steps`` MTP iterations at a constant lr and a constant mu (E starts at 0).

    The coupling and the multiplier update are MTP's own (``MTP.couple_``, ``MTP.update_multipliers``),
    called on a stand-in that holds only what they read (mu, rho, E, the two parameter lists)."""
    w1, w3 = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    state = SimpleNamespace(mu=mu, rho=1.0, E=[torch.zeros_like(w1)], p1=[w1], p3=[w3], cfg={"mu_max": mu})
    for t in range(steps):
        w1 -= lr * A * (w1 - P)                       # W1's data step (Eq. 7 without the coupling)
        MTP.couple_(state, [w1], [w3], lr, +1.0)
        w3 -= lr * B * (w3 - Q)                       # W3's data step (Eq. 9 without the coupling)
        MTP.couple_(state, [w3], [w1], lr, -1.0)
        if (t + 1) % every == 0:
            MTP.update_multipliers(state)             # Eq. 10
    return float(w1), float(w3)


def single(lr: float, steps: int) -> float:
    """One copy after ``steps`` gradient-descent steps on l_cls + l_seg."""
    w = 0.0
    for _ in range(steps):
        w -= lr * (A * (w - P) + B * (w - Q))
    return w


def main() -> None:
    print("T     single lr 0.01  single lr 0.02  MTP lr 0.02 (W1+W3)/2  MTP lr 0.04 (W1+W3)/2")
    for steps in (10, 30, 100, 300):
        m2, m4 = mtp_pair(0.02, steps), mtp_pair(0.04, steps)
        print(f"{steps:<5} {single(0.01, steps):>14.3f}  {single(0.02, steps):>14.3f}  {sum(m2) / 2:>21.3f}"
              f"  {sum(m4) / 2:>21.3f}")


if __name__ == "__main__":
    main()
