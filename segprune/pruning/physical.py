"""Physical channel removal with Torch-Pruning (DepGraph): the result is a smaller dense network.

``prune_channels`` removes, for every unit, the channels not in its keep set from the root
convolution, its BatchNorm and every coupled consumer (next convolution's input channels,
concatenations, residual adds). Before removing, it folds the constant output of every removed
channel whose BatchNorm γ is exactly 0 into the channel's consumers (:func:`fold_removed_constants`,
"exact removal"; docs/methods.md). ``widths_spec`` records the result as plain JSON and
``apply_widths`` re-creates exactly that architecture from a freshly built model, so a pruned
model is rebuilt from ``arch.json`` + safetensors weights without unpickling anything.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers

from .groups import PruneUnit, _forward_both, build_graph, discover_units

__all__ = ["prune_channels", "fit_channel_groups", "widths_spec", "apply_widths", "layer_widths",
           "fold_removed_constants", "zero_gamma_removed", "removed_gamma_share", "COMPENSATE_MODES"]

#: ``compensate`` values of :func:`prune_channels` / :func:`fold_removed_constants`
COMPENSATE_MODES = ("off", "exact", "interior")


def _removed(u: PruneUnit, kept: dict[str, torch.Tensor]) -> list[int]:
    keep = kept.get(u.name)
    if keep is None:
        return []
    keep_set = set(int(i) for i in keep.tolist())
    return [i for i in range(u.channels) if i not in keep_set]


def zero_gamma_removed(model: nn.Module, units: list[PruneUnit], kept: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Unit name -> the removed channels (not in ``kept``) whose γ is exactly 0 in every BatchNorm of
    the unit (units without such a channel are left out). Only these are compensated: in eval mode
    such a channel's BatchNorm outputs its β whatever the input, so everything downstream of it up
    to the next layer with weights is a known constant."""
    mods = dict(model.named_modules())
    out = {}
    for u in units:
        drop = _removed(u, kept)
        if not drop:
            continue
        zero = torch.ones(u.channels, dtype=torch.bool)
        for b in u.bns:
            w = mods[b].weight
            if w is None or w.numel() != u.channels:
                zero[:] = False
                break
            zero &= (w.detach() == 0).cpu()
        idx = [i for i in drop if bool(zero[i])]
        if idx:
            out[u.name] = idx
    return out


def _padded(conv: nn.Conv2d) -> bool:
    """True if ``conv`` reads zeros outside its input (zero padding with a kernel extent > 1 or padding > 0)."""
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding of a constant channel is that constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(d * (k - 1) > 0 for d, k in zip(conv.dilation, conv.kernel_size))
    return any(int(p) > 0 for p in conv.padding)


def fold_removed_constants(model: nn.Module, units: list[PruneUnit], kept: dict[str, torch.Tensor],
                           graph: tp.DependencyGraph | None = None, mode: str = "interior",
                           input_size: tuple[int, int] = (64, 64)) -> dict:
    """Fold the constant output of every removed channel with γ = 0 into its consumers, in place,
    before the channels are removed ("exact removal", docs/methods.md).

    A channel whose BatchNorm γ is 0 outputs β (eval mode), then the activation and any
    per-element or pooling ops before its consumers: a constant c per consumer input channel j,
    independent of the image. Removing the channel drops the term ``W[:, j] * c`` from each
    consumer. This function adds it back:

    * consumer ``Conv2d`` (groups 1), weight (O, I, kh, kw): ``delta = Σ_{kh,kw} W[:, j] * c`` (O,),
      added to the conv's bias, or, without a bias, subtracted from the ``running_mean`` of the
      BatchNorm that alone reads the conv's output (exact in eval mode; in training mode the batch
      mean absorbs the shift anyway). Exact where the conv never reads its zero padding (1×1
      kernels, padding 0, or a non-zero padding mode). A zero-padded k×k conv sees c inside the
      feature map but 0 in the padding, so the fold is exact only on output pixels whose receptive
      field lies inside the map and approximate on the border ring whose windows reach into the padding
      (about padding/stride output pixels wide):
      folded with ``mode="interior"``, skipped with ``mode="exact"``.
    * consumer ``Linear`` (O, F): ``delta = W[:, j] * c`` added to its bias (exact).
    * a constant c = 0 (e.g. ReLU(β) with β <= 0) needs no fold: removal is exact as it is.
    * skipped, and counted in the record with the reason: a conv or Linear without bias and without
      a BatchNorm after it, grouped convs (a depthwise conv is coupled: its own channel is removed
      too and its consumers are handled in turn), any other layer with weights (e.g. PReLU,
      GroupNorm), a consumer whose input channel is not constant (e.g. the channel is multiplied by
      an attention map first), and consumers the traced forward never calls.

    The constants are read, not derived: one forward pass in eval mode (``torch.no_grad``) of two
    random images (2, C, H, W) at ``input_size`` through the segmentation (and auxiliary and
    classification, as traced by ``build_graph``) forward, with hooks on the consumers; an input
    channel counts as constant when its max and min over batch and space agree to 1e-6 relative.
    All constants are read on the unmodified network, then every fold is applied, so units that
    feed each other compose exactly. Nothing is done (no forward pass) when no removed channel has
    γ == 0 exactly: the network is then bitwise what it was.

    Args:
        model: the network (N, C, H, W) -> logits, before removal; changed in place (biases and
            BatchNorm running means of consumers only, no shapes).
        units, kept: as :func:`prune_channels`.
        graph: the DepGraph traced on ``model`` (``build_graph``); traced if None.
        mode: "off" (nothing), "exact" (only the exact folds) or "interior" (also zero-padded k×k convs).
        input_size: (H, W) of the probe images.

    Returns:
        JSON-able record: ``mode``, ``channels`` (removed channels with γ == 0), ``exact`` /
        ``interior`` (folds applied, one per consumer and channel), ``zero_constant`` (channels
        whose constant is 0 at a consumer: exact without a fold), ``skipped`` (reason -> count)
        and ``skipped_where`` (up to 20 "consumer: reason" strings).

    Raises:
        ValueError: ``mode`` not in :data:`COMPENSATE_MODES`.
    """
    if mode not in COMPENSATE_MODES:
        raise ValueError(f"compensate={mode!r} must be one of {', '.join(COMPENSATE_MODES)}")
    rec: dict = {"mode": mode, "channels": 0, "exact": 0, "interior": 0, "zero_constant": 0, "skipped": {},
                 "skipped_where": []}
    if mode == "off":
        return rec
    zero = zero_gamma_removed(model, units, kept)
    rec["channels"] = sum(len(v) for v in zero.values())
    if not zero:
        return rec
    graph = graph or build_graph(model, input_size)
    mods = dict(model.named_modules())
    names = {m: n for n, m in mods.items()}
    by_name = {u.name: u for u in units}

    def skip(where: str, why: str, n: int = 1) -> None:
        rec["skipped"][why] = rec["skipped"].get(why, 0) + n
        tag = f"{where}: {why}"
        if tag not in rec["skipped_where"] and len(rec["skipped_where"]) < 20:
            rec["skipped_where"].append(tag)

    wanted: dict[str, set[int]] = {}  # consumer module -> its input channels carrying a removed γ = 0 channel
    for uname, idx in zero.items():
        u = by_name[uname]
        own = set(u.convs) | set(u.bns)
        group = graph.get_pruning_group(mods[uname], tp.prune_conv_out_channels, idxs=idx)
        for dep, idxs in group:
            mod = dep.target.module
            name = names.get(mod) if isinstance(mod, nn.Module) else None
            if name is None:
                if isinstance(mod, nn.Parameter):
                    skip(str(dep.target.name), "a bare nn.Parameter consumer", len(idx))
                continue  # graph ops (activations, adds, concatenations, pooling): the constant passes through
            if name in own:
                continue
            plain = [int(i) for i in _helpers.to_plain_idxs(idxs)]
            if isinstance(mod, nn.Conv2d):
                if mod.groups == 1:
                    wanted.setdefault(name, set()).update(plain)
                elif not (mod.groups == mod.in_channels == mod.out_channels):
                    skip(name, "grouped conv", len(plain))
            elif isinstance(mod, nn.Linear):
                wanted.setdefault(name, set()).update(plain)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                skip(name, "BatchNorm outside the unit", len(plain))
            elif any(True for _ in mod.parameters(recurse=False)):
                skip(name, f"{type(mod).__name__} consumer", len(plain))
    if not wanted:
        return rec

    # ---- read the constants: one probe forward with hooks on the consumers -----------------------
    order = {n: sorted(v) for n, v in wanted.items()}
    stats: dict[str, list[torch.Tensor]] = {}

    def hook_for(name: str):
        cols = order[name]

        def hook(mod, args):
            x = args[0].detach()
            sel = x.index_select(1 if isinstance(mod, nn.Conv2d) else x.dim() - 1,
                                 torch.tensor(cols, device=x.device))
            v = sel.transpose(0, 1).reshape(len(cols), -1) if isinstance(mod, nn.Conv2d) else sel.reshape(-1, len(cols)).t()
            lo, hi = v.amin(1).double(), v.amax(1).double()
            if name in stats:
                lo, hi = torch.minimum(lo, stats[name][0]), torch.maximum(hi, stats[name][1])
            stats[name] = [lo, hi]
        return hook
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(0)  # the global RNG stream is left alone
    x = torch.randn(2, int(getattr(model, "input_channels", 3)), *input_size, generator=gen)
    x[1] *= 3.0
    handles = [mods[n].register_forward_pre_hook(hook_for(n)) for n in order]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _forward_both(model, x.to(device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    # ---- fold ---------------------------------------------------------------------------------
    deltas: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (target tensor, delta, sign)
    for name, cols in order.items():
        mod = mods[name]
        if name not in stats:
            skip(name, "never called by the traced forward", len(cols))
            continue
        lo, hi = stats[name]
        const = (hi + lo) / 2
        ok = (hi - lo) <= 1e-6 * torch.maximum(hi.abs(), lo.abs())
        w = mod.weight.detach().double()
        w_cols = w[:, cols].sum(dim=(2, 3)) if isinstance(mod, nn.Conv2d) else w[:, cols]  # (O, len(cols))
        use = []
        for k, j in enumerate(cols):
            if not bool(ok[k]):
                skip(name, "input channel not constant", 1)
            elif float(const[k]) == 0.0:
                rec["zero_constant"] += 1
            else:
                use.append(k)
        if not use:
            continue
        interior = isinstance(mod, nn.Conv2d) and _padded(mod)
        if interior and mode == "exact":
            skip(name, "zero-padded k×k conv (borders would differ; compensate='interior' folds it)", len(use))
            continue
        delta = w_cols[:, use] @ const[use].to(w_cols.device)  # (O,)
        if mod.bias is not None:
            deltas.append((mod.bias, delta, 1.0))
        else:
            outs = {o.module for o in graph.module2node[mod].outputs} if mod in graph.module2node else set()
            bn = next(iter(outs)) if len(outs) == 1 else None
            if not (isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None
                    and bn.running_mean.numel() == delta.numel()):
                skip(name, "no bias and no BatchNorm reading it alone", len(use))
                continue
            deltas.append((bn.running_mean, delta, -1.0))
        rec["interior" if interior else "exact"] += len(use)
    with torch.no_grad():
        for target, delta, sign in deltas:
            target.add_((sign * delta).to(device=target.device, dtype=target.dtype))
    return rec


def removed_gamma_share(model: nn.Module, units: list[PruneUnit], kept: dict[str, torch.Tensor]) -> dict:
    """Share of Σ|γ| that a removal deletes, over the BatchNorm γ of the prunable units (each BN of a
    unit counted once per unit), per part and in total; call it before :func:`prune_channels`.

    Returns:
        ``{"total": float, "parts": {part: float}}``, each Σ_removed |γ| / Σ_all |γ| in [0, 1]
        (0.0 for a part whose γ sum to 0).
    """
    mods = dict(model.named_modules())
    rem: dict[str, float] = {}
    tot: dict[str, float] = {}
    for u in units:
        drop = _removed(u, kept)
        for b in u.bns:
            g = mods[b].weight.detach().abs().double()
            tot[u.part] = tot.get(u.part, 0.0) + float(g.sum())
            rem[u.part] = rem.get(u.part, 0.0) + (float(g[drop].sum()) if drop else 0.0)
    all_t, all_r = sum(tot.values()), sum(rem.values())
    return {"total": all_r / all_t if all_t > 0 else 0.0,
            "parts": {k: (rem[k] / tot[k] if tot[k] > 0 else 0.0) for k in tot}}


def fit_channel_groups(keep: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """Make a kept set prunable under a GroupNorm with ``groups`` groups (C/G channels each).

    Position j of the groups (channels j, C/G + j, 2C/G + j, ...) is kept in every group or in none.
    The positions kept are the k = max(1, round(|keep| / G)) that ``keep`` holds in the most
    groups (ties: lower position), so the count stays as close to ``|keep|`` as a multiple of G
    allows. A kept set that already fits is returned unchanged.

    Args:
        keep: (k,) LongTensor of kept channel indices in 0..C-1.
    Returns:
        sorted LongTensor (G * k,) of channel indices.
    """
    per = channels // groups
    keep = keep.long().cpu()
    votes = torch.zeros(per, dtype=torch.long, device="cpu")
    votes.index_add_(0, keep % per, torch.ones(keep.numel(), dtype=torch.long, device="cpu"))
    k = max(1, int(round(keep.numel() / groups)))
    pos = torch.sort(torch.argsort(-votes, stable=True)[:k]).values
    out = (torch.arange(groups, device="cpu").unsqueeze(1) * per + pos.unsqueeze(0)).flatten()
    out = torch.sort(out).values
    return keep if torch.equal(out, torch.sort(keep.long()).values) else out


def prune_channels(model: nn.Module, units: list[PruneUnit], kept: dict[str, torch.Tensor],
                   graph: tp.DependencyGraph | None = None, input_size: tuple[int, int] = (64, 64),
                   compensate: str = "interior", record: dict | None = None) -> nn.Module:
    """Remove, in place, every channel of each unit that is not listed in ``kept[unit.name]``.

    A unit normalised by a GroupNorm (``unit.extra["channel_groups"]`` = G) loses whole positions of
    its groups (:func:`fit_channel_groups`); its entry of ``kept`` is replaced, in place, by the
    indices actually kept, so a :func:`widths_spec` written afterwards records the real widths.

    Args:
        model: the network; traced at ``input_size`` when ``graph`` is None.
        units: its prunable units (``discover_units``).
        kept: unit name -> LongTensor of the channel indices to keep (a unit not listed keeps all).
        graph: the DepGraph traced on ``model``.
        input_size: (H, W) for tracing and for the probe forward of the compensation.
        compensate: "interior" (default), "exact" or "off": fold the constant output of removed
            channels with γ == 0 into their consumers first (:func:`fold_removed_constants`). It
            changes nothing when no removed channel has γ exactly 0.
        record: if given, updated with :func:`fold_removed_constants`'s record.

    Raises:
        ValueError: a unit would lose all its channels, a kept index is out of range, or an
            unknown ``compensate``.
    """
    graph = graph or build_graph(model, input_size)
    mods = dict(model.named_modules())
    drops = {}
    for u in units:
        keep = kept.get(u.name)
        if keep is None:
            continue
        keep_set = set(int(i) for i in keep.tolist())
        if not keep_set:
            raise ValueError(f"unit {u.name} would keep no channel; refusing to empty a layer")
        if max(keep_set) >= u.channels or min(keep_set) < 0:
            raise ValueError(f"unit {u.name}: kept index out of range 0..{u.channels - 1}")
        groups = int(u.extra.get("channel_groups", 1))
        if groups > 1:
            fitted = fit_channel_groups(torch.as_tensor(sorted(keep_set)), u.channels, groups)
            kept[u.name] = fitted
            keep_set = set(int(i) for i in fitted.tolist())
        drops[u.name] = [i for i in range(mods[u.name].out_channels) if i not in keep_set]
    rec = fold_removed_constants(model, units, kept, graph, compensate, input_size)
    if record is not None:
        record.update(rec)
    for u in units:
        drop = drops.get(u.name)
        if not drop:
            continue
        group = graph.get_pruning_group(mods[u.name], tp.prune_conv_out_channels, idxs=drop)
        if not graph.check_pruning_group(group):
            raise ValueError(f"unit {u.name}: Torch-Pruning refused the group (would empty a layer)")
        group.prune()
    return model


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Conv layer name -> [in_channels, out_channels] (for reports and Figure-5-style plots)."""
    return {n: [m.in_channels, m.out_channels] for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def widths_spec(units: list[PruneUnit], kept: dict[str, torch.Tensor], include_coupled: bool) -> dict:
    """JSON-able description of a pruning: per unit, original and kept channel counts."""
    return {
        "include_coupled": bool(include_coupled),
        "units": {u.name: {"part": u.part, "channels": u.channels,
                           "kept": int(kept[u.name].numel()) if u.name in kept else u.channels}
                  for u in units},
    }


def apply_widths(model: nn.Module, spec: dict, input_size: tuple[int, int] = (64, 64), source: str = "arch.json") -> nn.Module:
    """Shrink a freshly built, unpruned ``model`` to the widths recorded in ``spec``.

    Each unit keeps its first ``kept`` channels; the weights are meant to be loaded afterwards.

    Raises:
        ValueError: the spec names a unit the model does not have, or channel counts disagree
            (the spec was written for another architecture); the message names ``source``.
    """
    graph = build_graph(model, input_size)
    units = {u.name: u for u in discover_units(model, graph, spec.get("include_coupled", False))}
    recorded = spec.get("units")
    if not isinstance(recorded, dict):
        raise ValueError(f"{source}: key 'units' missing or not a mapping")
    kept = {}
    for name, rec in recorded.items():
        if name not in units:
            raise ValueError(f"{source}: unit {name!r} does not exist in this model (another architecture?)")
        if int(rec.get("channels", -1)) != units[name].channels:
            raise ValueError(f"{source}: unit {name!r} has {units[name].channels} channels in this model "
                             f"but {rec.get('channels')} in the file (another architecture or width?)")
        k = int(rec.get("kept", -1))
        if not 1 <= k <= units[name].channels:
            raise ValueError(f"{source}: unit {name!r} kept={rec.get('kept')!r} outside 1..{units[name].channels}")
        kept[name] = torch.arange(k)
    return prune_channels(model, list(units.values()), kept, graph, compensate="off")
