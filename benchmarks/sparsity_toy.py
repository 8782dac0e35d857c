"""Issue 15: the ℓ1 step on a toy, proximal vs sub-gradient, constant vs growing schedule.

Network Slimming on a width-0.125 DeepLabv3-R18 (32x32 random images, labels from two pixel
thresholds), keep 0.5 Ind, 40 steps, lr 0.02, momentum 0.9. Prints, per combination, the |γ| of the
channels the prune step removes and the fraction exactly zero. The sub-gradient with the growing
schedule is refused by the config checks; it is run here (by bypassing that check) to show why.

    python benchmarks/sparsity_toy.py
"""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import segprune.methods.sparsity as S
from segprune.algorithm import Budget, choose_widths, sparsify
from segprune.engine.log import StageLog
from segprune.engine.train import make_loader
from segprune.methods import build_method
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units


def _loader(n=16, bs=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return make_loader(TensorDataset(x, y), bs, True, seed)


def main() -> None:
    torch.set_num_threads(1)
    orig = S.L1Sparsity.__init__

    def init(self, groups, mode, schedule, *a, **k):   # let the refused combination run
        orig(self, groups, "proximal", schedule, *a, **k)
        self.mode = mode
    S.L1Sparsity.__init__ = init
    print("| ℓ1 step | schedule | max / mean |γ| removed | exactly zero |\n|---|---|---|---|")
    for mode in ("proximal", "subgradient"):
        for sched in ("constant", "growing"):
            torch.manual_seed(0)
            m = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 8}, 3, 4)
            units = discover_units(m, build_graph(m, (32, 32)))
            meth = build_method({"name": "slimming", "epochs": 10, "lr_seg": 0.02, "momentum": 0.9,
                                 "weight_decay": 1e-4, "alpha": 1e-3, "l1_mode": mode, "l1_schedule": sched})
            budget = Budget(keep_ratio=0.5, min_channels=1)
            sparsify(meth, m, units, _loader(), None, 255, StageLog("t", quiet=True), budget, (32, 32))
            kept, _ = choose_widths(meth, m, units, budget, (32, 32))
            mods, rem = dict(m.named_modules()), []
            for u in units:
                mask = torch.ones(u.channels, dtype=torch.bool)
                mask[kept[u.name]] = False
                rem += [mods[b].weight.detach().abs()[mask] for b in u.bns]
            g = torch.cat(rem)
            print(f"| {mode} | {sched} | {float(g.max()):.4g} / {float(g.mean()):.4g} | {100 * float((g == 0).float().mean()):.0f} % |")


if __name__ == "__main__":
    main()
