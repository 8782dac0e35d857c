"""ThiNet (Luo et al., "ThiNet: A Filter Level Pruning Method for Deep Neural Network
Compression", ICCV 2017): prune the channels of a layer that the *next* layer can do without.

For a consumer convolution W (O, C_in, kh, kw) reading the unit's channels, one sampled output
entry (image n, location l, output channel o) is, without bias, (Eqs. 1-3)

    ŷ = Σ_c x̂_c,     x̂_c = Σ_k W[o, c, k] · x_c[patch_l, k]     (k runs over the kh·kw taps),

so dropping a set T of channels changes ŷ by Σ_{j∈T} x̂_j. ThiNet chooses T with
|T| = (1 − p)·C to minimise Σ_samples (Σ_{j∈T} x̂_j)²  (Eq. 5) by the greedy Algorithm 1:
starting from T = ∅, repeatedly add the channel c that minimises the objective of T ∪ {c}.

Implementation notes:

* Samples: ``calib_batches`` batches (default 2) of the calibration loader, model in eval mode;
  per image ``samples_per_batch`` (default 64) output locations drawn uniformly (with
  replacement), each with a uniformly drawn output channel o (seeded by ``seed``, default 0).
  The draws come from a CPU generator whatever the model's device (the same samples everywhere)
  and are moved to it; the batches are moved to the model's device, where the Gram matrices are
  accumulated.
* Consumers are found with the unit's torch-pruning group: every ``nn.Conv2d`` with an
  in-channel pruning handler, together with the slice of its input channels that the unit's
  channels occupy (e.g. one fifth of ASPP ``project`` through the concatenation). Their input
  is captured by forward pre-hooks. If a unit has several consumers (coupled units), the
  objectives are summed.
* The objective only needs the Gram matrix G = Σ_samples x̂ x̂ᵀ (C, C):
  Σ_s (Σ_{j∈T} x̂_sj)² = 1_Tᵀ G 1_T, and adding c to T costs G[c, c] + 2 Σ_{j∈T} G[j, c].
  Only G is accumulated (float64), never the samples.
* The greedy removal order does not depend on p (the greedy for a smaller p is a prefix of the
  one for a larger p), so :meth:`ThiNet.scores` runs it to completion and scores each channel by
  its position in the removal order (removed first = 0 = least important);
  :meth:`ThiNet.select` runs it only for the (1 − p)·C channels to remove.
* Least-squares rescaling of the remaining filters (Eqs. 6-7) is NOT implemented; the pipeline's
  fine-tuning recovers accuracy instead.
* Only ungrouped convolutions with numeric padding (zeros) are supported as consumers. A depthwise
  convolution inside a unit (inverted-residual chain: its output channels *are* the unit's
  channels) is not a consumer: ThiNet reconstructs the layers after it that mix the channels
  (the projection convolution, a squeeze-excitation's first convolution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from ..pruning.groups import PruneUnit, build_graph, is_depthwise
from ..pruning.thresholds import check_keep_ratio
from .base import PruningMethod, register_method

__all__ = ["ThiNet", "consumer_slices", "channel_contributions", "thinet_objective", "thinet_greedy"]


def consumer_slices(model: nn.Module, units: list[PruneUnit], graph: tp.DependencyGraph | None = None,
                    input_size: tuple[int, int] = (64, 64)) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Unit name -> [(consumer conv name, in_idx (C,) LongTensor)]: channel c of the unit is input
    channel ``in_idx[c]`` of that consumer (on the consumer's device). Found from the unit's
    torch-pruning group."""
    graph = graph or build_graph(model, input_size)
    mods = dict(model.named_modules())
    names = {m: n for n, m in mods.items()}
    out = {}
    for u in units:
        group = graph.get_pruning_group(mods[u.name], tp.prune_conv_out_channels, idxs=list(range(u.channels)))
        found: dict[str, torch.Tensor] = {}
        for item in group.items:
            mod = item.dep.target.module
            if not (isinstance(mod, nn.Conv2d) and graph.is_in_channel_pruning_fn(item.dep.handler)) or is_depthwise(mod):
                continue
            in_idx = torch.empty(u.channels, dtype=torch.long, device="cpu")
            in_idx[torch.as_tensor(list(item.root_idxs), dtype=torch.long, device="cpu")] = torch.as_tensor(
                list(item.idxs), dtype=torch.long, device="cpu")
            found[names[mod]] = in_idx.to(mod.weight.device)
        out[u.name] = list(found.items())
    return out


def channel_contributions(x: torch.Tensor, conv: nn.Conv2d, in_idx: torch.Tensor, samples_per_image: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-channel terms x̂_c of sampled output entries of ``conv`` (ThiNet Eq. 2).

    Args:
        x: the consumer's input (N, C_in, H, W).
        conv: the consumer convolution (groups = 1, numeric zero padding).
        in_idx: (C,) input-channel indices of the unit's channels in ``conv``.
        samples_per_image: S output locations drawn per image (each with a random output channel).
        generator: the draws' generator; they are made on its device (CPU for ``None``) and moved
            to ``x``'s, so a CPU generator gives the same samples on every device.

    Returns:
        (N·S, C): x̂[s, c] = Σ_k W[o_s, in_idx[c], k] · x[n_s, in_idx[c], patch of l_s, k].
    """
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError(f"ThiNet supports ungrouped, zero-padded consumers only, got {conv}")
    xs = x.detach()[:, in_idx].float()                                   # (N, C, H, W)
    cols = F.unfold(xs, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    n, ck, L = cols.shape
    c = in_idx.numel()
    k = ck // c
    gdev = generator.device if generator is not None else torch.device("cpu")
    loc = torch.randint(0, L, (n, samples_per_image), generator=generator, device=gdev).to(x.device)         # (N, S)
    och = torch.randint(0, conv.out_channels, (n, samples_per_image), generator=generator, device=gdev).to(x.device)
    patches = torch.gather(cols, 2, loc.unsqueeze(1).expand(n, ck, samples_per_image))         # (N, C·K, S)
    patches = patches.permute(0, 2, 1).reshape(n, samples_per_image, c, k)
    w = conv.weight.detach()[:, in_idx].flatten(2).float()[och]                                # (N, S, C, K)
    return (patches * w).sum(-1).reshape(n * samples_per_image, c)


def thinet_objective(xhat: torch.Tensor, removed) -> float:
    """Σ_samples (Σ_{j∈removed} x̂_j)² for x̂ (S, C) (ThiNet Eq. 5)."""
    idx = torch.as_tensor(list(removed), dtype=torch.long, device=xhat.device)
    if idx.numel() == 0:
        return 0.0
    return float(xhat.double()[:, idx].sum(1).pow(2).sum())


def thinet_greedy(gram: torch.Tensor, n_remove: int) -> torch.Tensor:
    """ThiNet Algorithm 1 on the Gram matrix G = Σ_s x̂_s x̂_sᵀ (C, C).

    Returns the (n_remove,) channel indices (on ``gram``'s device) in the order they are added to the
    removed set T; each step adds the c minimising 1ᵀ G_{T∪{c}} 1 (ties: lowest index).
    """
    g = gram.double()
    c = g.shape[0]
    n_remove = max(0, min(int(n_remove), c))
    diag = torch.diagonal(g).clone()
    cross = torch.zeros(c, dtype=torch.float64, device=g.device)      # Σ_{j∈T} G[j, c]
    avail = torch.ones(c, dtype=torch.bool, device=g.device)
    order = []
    for _ in range(n_remove):
        cost = (diag + 2.0 * cross).masked_fill(~avail, float("inf"))
        j = int(torch.argmin(cost))
        order.append(j)
        avail[j] = False
        cross += g[j]
    return torch.tensor(order, dtype=torch.long, device=g.device)


@register_method
class ThiNet(PruningMethod):
    """ThiNet greedy channel selection from next-layer reconstruction (per-layer ratio).

    cfg: ``calib_batches`` (2), ``samples_per_batch`` (64 per image); the dependency graph that
    maps units to their consumers is traced at ``input_size`` (:class:`PruningMethod`).
    """

    name = "thinet"
    config_keys = ("calib_batches", "samples_per_batch")
    per_layer = True

    def __init__(self, cfg, input_size: tuple[int, int] | None = None):
        super().__init__(cfg, input_size)
        self.calib_batches = int(self.cfg["calib_batches"])
        self.samples = int(self.cfg["samples_per_batch"])
        self.seed = 0  # seed of the position sampling generator (fixed: not a config key)
        self.graph_input_size = self.input_size
        if self.calib_batches < 1 or self.samples < 1:
            raise ValueError("method.calib_batches and method.samples_per_batch must be >= 1")

    def gram_matrices(self, model: nn.Module, units: list[PruneUnit], calib_loader) -> dict[str, torch.Tensor]:
        """Unit name -> G = Σ over consumers and samples of x̂ x̂ᵀ, (C, C) float64 on the unit's device."""
        if calib_loader is None:
            raise ValueError("ThiNet needs a calibration loader (images of the segmentation training set)")
        slices = consumer_slices(model, units, input_size=self.graph_input_size)
        mods = dict(model.named_modules())
        by_consumer: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for u in units:
            if not slices[u.name]:
                raise ValueError(f"ThiNet: unit {u.name} feeds no convolution; cannot score it (its channels are read "
                                 f"only by other layers, e.g. ConvTranspose2d or Linear; list it in never_prune)")
            for cname, in_idx in slices[u.name]:
                by_consumer.setdefault(cname, []).append((u.name, in_idx))
        grams = {u.name: torch.zeros(u.channels, u.channels, dtype=torch.float64, device=mods[u.name].weight.device)
                 for u in units}
        gen = torch.Generator(device="cpu").manual_seed(self.seed)  # the same samples on every device
        dev = next(model.parameters()).device

        def hook_for(cname):
            conv = mods[cname]

            def hook(mod, inputs):
                for uname, in_idx in by_consumer[cname]:
                    xh = channel_contributions(inputs[0], conv, in_idx, self.samples, gen).double()
                    grams[uname] += xh.T @ xh
            return hook

        handles = [mods[c].register_forward_pre_hook(hook_for(c)) for c in by_consumer]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i, batch in enumerate(calib_loader):
                    if i >= self.calib_batches:
                        break
                    model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(dev, non_blocking=True))
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        return grams

    def scores(self, model: nn.Module, units: list[PruneUnit], calib_loader=None) -> dict[str, torch.Tensor]:
        """Unit name -> (C,) position of each channel in the complete greedy removal order
        (0 = removed first = least important; C − 1 = removed last)."""
        grams = self.gram_matrices(model, units, calib_loader)
        out = {}
        for name, g in grams.items():
            order = thinet_greedy(g, g.shape[0])
            s = torch.empty(g.shape[0], device=g.device)
            s[order] = torch.arange(g.shape[0], dtype=torch.float32, device=g.device)
            out[name] = s
        return out

    def select(self, model: nn.Module, units: list[PruneUnit], keep_ratio: float, threshold_mode: str = "ind",
               min_channels: int = 1, calib_loader=None) -> dict[str, torch.Tensor]:
        """Greedily remove ``C − k`` channels per unit, k = max(round(p·C), min(min_channels, C));
        returns the sorted kept indices (``threshold_mode`` is ignored: per-layer ratio)."""
        p = check_keep_ratio(keep_ratio)
        if int(min_channels) < 1:
            raise ValueError(f"prune.min_channels={min_channels!r} must be >= 1")
        grams = self.gram_matrices(model, units, calib_loader)
        kept = {}
        for name, g in grams.items():
            c = g.shape[0]
            k = max(int(round(p * c)), min(int(min_channels), c))
            mask = torch.ones(c, dtype=torch.bool, device=g.device)
            mask[thinet_greedy(g, c - k)] = False
            kept[name] = torch.nonzero(mask).flatten()
        return kept
