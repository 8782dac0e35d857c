"""``segprune compare``: the paper's Table 2 / Figure 5 / Figure 6 from finished run folders.

Inputs are run folders (``metrics.json`` + ``config.yaml`` + ``stages/``) or sweep folders (whose
sub-folders are run folders). Outputs, in ``out``:

* ``table.md`` / ``table.csv``: per setting (method, target: a channel keep ratio or a FLOPs ratio
  (``prune.target_flops_ratio``), threshold mode, fine-tuning),
  mean ± sample std over seeds of mIoU, ΔmIoU to the baseline, params / FLOPs / latency as a
  fraction of the baseline (×), mIoU before fine-tuning, the prune-step loss (mIoU after sparsity
  training minus mIoU right after removal, in points), the share of Σ|γ| the removal deleted,
  classification top-1 of the pruned backbone and kept channels per part; the CSV has one line per
  run. Run folders made before a metric existed give empty cells.
* ``pareto.png``: mIoU (%) against GFLOPs, one point per run, the non-dominated front drawn.
* ``widths.png``: output channels per prunable conv layer, baseline and pruned, backbone and
  decoder in separate panels (MTP paper, Figure 5).
* ``qualitative.png``: input, ground truth, baseline and pruned predictions on fixed eval
  images, coloured with the dataset's palette (MTP paper, Figure 6).

FLOPs count one multiply-add as 2 FLOPs (``torch.utils.flop_counter``).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .checkpoint import CheckpointError, atomic_write_bytes, load_json
from .config import ConfigError, read_run_config

__all__ = ["RunRecord", "collect_runs", "group_runs", "render_table", "write_csv", "compare"]


def target_label(kind: str, value: float) -> str:
    """Markdown/CSV label of a pruning target: ``"FLOPs 0.50×"`` or ``"channels 0.5×"``."""
    return f"FLOPs {value:.2f}×" if kind == "flops" else f"channels {value:g}×"


class RunRecord:
    """One finished run: its folder, resolved config, metrics and the setting it belongs to."""

    def __init__(self, path: Path, cfg: dict, metrics: dict):
        self.path, self.cfg, self.m = path, cfg, metrics
        self.top1_ft = self.top1_base = None  # filled by collect_runs
        self.name = path.name
        self.method = metrics["method"]
        self.keep = float(metrics["keep_ratio"])  # with a FLOPs target: the keep ratio the search found
        # FLOPs target of the run (prune.target_flops_ratio), None for a channel keep ratio; runs made
        # before the key existed have none in metrics.json nor in config.yaml
        t = metrics.get("target_flops_ratio", (cfg.get("prune") or {}).get("target_flops_ratio"))
        self.target = None if t is None else float(t)
        self.threshold = metrics["threshold_mode"]
        # prune.round_to (widths rounded to multiples; 1 = off): another setting, never pooled with unrounded runs
        self.round_to = int((cfg.get("prune") or {}).get("round_to", 1) or 1)
        self.seed = int(cfg["seed"])
        self.ft = "seg only" if int(cfg["finetune"]["cls"]["epochs"]) == 0 else "cls+seg"
        base_done = path / "stages" / "02_train_seg" / "done.json"
        info = load_json(base_done) if base_done.is_file() else {}
        # runs trained on the same baseline share its fingerprint (see pipeline.stage_fingerprints)
        self.baseline_id = info.get("fingerprint") or f"miou={metrics['baseline']['miou']:.6f}"
        self.result_id = _result_id(cfg)

    @property
    def variant_values(self) -> dict:
        """The run's config as ``{"section.key": value}`` over the sections a result depends on
        (:data:`RESULT_SECTIONS`), without ``seed``: what tells two variants of one setting apart."""
        return {k: v for k, v in _flatten(self.cfg).items() if k.split(".")[0] in RESULT_SECTIONS}

    def backbone_top1(self, stage: str, compute: bool = False) -> float | None:
        """Top-1 on the classification eval split of the backbone right after ``stage``
        ("pretrain_cls": the baseline's, "finetune_cls": the pruned one's; MTP paper, Table 5).
        Read from the stage's done.json; else evaluated from its weights if ``compute``."""
        from .pipeline import stage_dir
        d = stage_dir(self.path, stage)
        info = load_json(d / "done.json") if (d / "done.json").is_file() else {}
        if info.get("top1") is not None or not compute or not info:
            return info.get("top1")
        from .data import build_cls_dataset
        from .engine.evaluate import evaluate_classification
        from .engine.train import make_loader
        from .pipeline import load_run_model
        model, _ = load_run_model(d)
        dcls = self.cfg["data"]["cls"]
        ds = build_cls_dataset(dcls, dcls["eval_split"], False, self.seed)
        return evaluate_classification(model.forward_cls, make_loader(ds, dcls["eval_batch_size"], False, 0))["top1"]

    @property
    def target_kind(self) -> tuple[str, float]:
        """("flops", target FLOPs ratio) for a run with ``prune.target_flops_ratio``, else ("channels", keep ratio)."""
        return ("flops", self.target) if self.target is not None else ("channels", self.keep)

    @property
    def target_label(self) -> str:
        """"FLOPs 0.50×" or "channels 0.5×" (+ ", widths ×8" with ``prune.round_to``): what the run was pruned to."""
        return target_label(*self.target_kind) + _round_label(self.round_to)

    @property
    def setting(self) -> tuple:
        thr = "-" if self.method in ("uniform", "thinet", "fpgm") else self.threshold
        return (self.method, self.target_kind, thr, self.ft, self.baseline_id, self.round_to)

    @property
    def group_key(self) -> tuple:
        """:attr:`setting` and :attr:`result_id`: runs with the same key differ in ``seed`` alone."""
        return (self.setting, self.result_id)

    @property
    def sparse_miou(self) -> float | None:
        """mIoU after sparsity training, before removal (None in run folders made before it was recorded)."""
        return (self.m.get("sparse") or {}).get("miou")

    @property
    def prune_step_loss(self) -> float | None:
        """Sparse mIoU minus the mIoU right after removal (a fraction, like ``delta_miou``), or None."""
        if self.m.get("prune_step_loss") is not None:
            return self.m["prune_step_loss"]
        before = self.m["pruned"].get("miou_before_finetune")
        return None if None in (self.sparse_miou, before) else self.sparse_miou - before

    @property
    def removed_gamma_share(self) -> float | None:
        """Share of the units' Σ|γ| that the removal deleted (0..1), or None."""
        return (self.m.get("removed_gamma_share") or {}).get("total")

    def __repr__(self) -> str:
        return f"RunRecord({self.name!r}, {self.method}, {self.keep})"


def collect_runs(paths: list[str | Path], eval_cls: bool = False) -> list[RunRecord]:
    """Finished runs under ``paths`` (run folders, or sweep folders holding run folders).

    ``eval_cls``: evaluate the backbone top-1 after the classification stages when the run folder
    does not record it (runs made before it was recorded).

    Raises:
        ConfigError: a path that does not exist, or holds no finished run (no ``metrics.json``).
        CheckpointError: an unreadable ``metrics.json`` (named).
    """
    out: list[RunRecord] = []
    for p in map(Path, paths):
        if not p.exists():
            raise ConfigError(f"{p}: no such run folder")
        cands = [p] if (p / "metrics.json").is_file() else sorted(q for q in p.iterdir() if (q / "metrics.json").is_file())
        if not cands:
            raise ConfigError(f"{p}: not a finished run folder (no metrics.json) and holds none")
        for q in cands:
            cfg = read_run_config(q)
            m = load_json(q / "metrics.json")
            try:
                rec = RunRecord(q, cfg, m)
                rec.top1_ft = rec.backbone_top1("finetune_cls", eval_cls)
                rec.top1_base = rec.backbone_top1("pretrain_cls", eval_cls)
                out.append(rec)
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{q / 'metrics.json'}: missing or bad field {exc}") from None
    return out


def _mean_std(vals: list[float]) -> tuple[float, float | None]:
    mu = sum(vals) / len(vals)
    if len(vals) < 2:
        return mu, None
    return mu, math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))


def _nan(v):
    return float("nan") if v is None else v


def _mean_std_opt(vals: list[float | None]) -> tuple[float, float | None] | None:
    """:func:`_mean_std`, or None when any run lacks the value (an older run folder): an empty cell."""
    return None if not vals or any(v is None for v in vals) else _mean_std(vals)


def kept_fraction(metrics: dict, part: str) -> float | None:
    """Kept / prunable channels of ``part`` in a run's ``metrics.json``; None when the part had no
    prunable unit (not in ``kept_per_part``: e.g. smp Segformer's LayerNorm encoder, LRASPP's gated head)."""
    k = (metrics.get("kept_per_part") or {}).get(part)
    return None if not k or not k[1] else k[0] / k[1]


def _pct0(ms) -> str:
    """A kept fraction as a whole percentage, or "–" for a part without prunable units."""
    return "–" if ms is None else f"{100 * ms[0]:.0f}"


#: Config sections whose values change a run's result (``seed`` apart); their differences name variants.
RESULT_SECTIONS = ("model", "data", "train", "method", "prune", "finetune", "eval")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _result_id(cfg: dict) -> str | None:
    """The core's fingerprint of everything the run's final result depends on, with ``seed`` set aside
    (``pipeline.stage_fingerprints``): runs that differ only in ``seed`` share it, runs with another
    hyper-parameter (``method.mu_max``, a fine-tuning lr, ...) do not. None for a config the
    fingerprint cannot read (such runs are grouped as before, by method, target, thresholds,
    fine-tuning and baseline)."""
    from .pipeline import stage_fingerprints
    try:
        return stage_fingerprints({**cfg, "seed": 0})["evaluate"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _variant_labels(subgroups: list[list[RunRecord]]) -> list[str]:
    """One label per subgroup of a setting: ``""`` for the largest (first seen on a tie), for the others
    the ``key=value`` pairs in which their first run differs from the largest's first run."""
    if len(subgroups) == 1:
        return [""]
    main = max(range(len(subgroups)), key=lambda i: (len(subgroups[i]), -i))
    ref = subgroups[main][0].variant_values
    labels = []
    for i, rs in enumerate(subgroups):
        mine = rs[0].variant_values
        diff = [f"{k}={mine.get(k)}" for k in sorted(set(ref) | set(mine)) if mine.get(k) != ref.get(k)]
        labels.append("" if i == main else (", ".join(diff) or "other settings"))
    return labels


def group_runs(runs: list[RunRecord]) -> list[dict]:
    """Aggregate runs of one setting over seeds.

    Returns one dict per setting (first-seen order) with ``method, target`` (label),
    ``target_kind`` ("channels" / "flops"), ``target_flops_ratio`` (None for a channel keep ratio),
    ``keep`` (the channel keep ratio; with a FLOPs target the mean of the ratios found), ``keep_std``,
    ``threshold, finetune, variant, seeds, runs`` and, for each of ``miou, delta_miou, params, flops, latency, miou_before_ft,
    cls_top1``, a ``(mean, std|None)`` pair; ``kept_backbone``, ``kept_decoder``, ``sparse_miou``, ``prune_step_loss``
    (fraction) and ``removed_gamma_share`` are such a pair, or None when a run of the setting lacks them (a part
    without prunable units, e.g. LRASPP's gated head or a LayerNorm encoder, has no kept fraction). ``params``, ``flops`` and
    ``latency`` are ratios pruned / baseline; ``kept_*`` fractions of the part's prunable channels.

    Only runs that differ in ``seed`` alone are pooled (:func:`_result_id`): a run with another
    hyper-parameter (an ablation such as ``method.mu_max: 2``) is a row of its own, and its ``variant``
    names the settings in which it differs from the setting's largest group (whose ``variant`` is "").
    """
    families: dict[tuple, dict[str | None, list[RunRecord]]] = {}
    for r in runs:
        families.setdefault(r.setting, {}).setdefault(r.result_id, []).append(r)
    groups = [(key, rs, label) for key, subs in families.items()
              for rs, label in zip(subs.values(), _variant_labels(list(subs.values())))]
    rows = []
    for (method, (kind, value), thr, ft, base, round_to), rs, variant in groups:
        keep, keep_std = _mean_std([r.keep for r in rs])

        def col(f):
            return _mean_std([f(r) for r in rs])

        rows.append({
            "method": method, "keep": keep, "keep_std": keep_std, "target": target_label(kind, value) + _round_label(round_to),
            "round_to": round_to,
            "target_kind": kind, "target_flops_ratio": value if kind == "flops" else None,
            "threshold": thr, "finetune": ft, "baseline_id": base, "variant": variant,
            "seeds": sorted(r.seed for r in rs), "runs": [r.name for r in rs],
            "miou": col(lambda r: r.m["pruned"]["miou"]), "delta_miou": col(lambda r: r.m["delta_miou"]),
            "params": col(lambda r: r.m["ratios"]["params"]), "flops": col(lambda r: r.m["ratios"]["flops"]),
            "latency": col(lambda r: r.m["ratios"]["latency_ms"]),
            "miou_before_ft": col(lambda r: r.m["pruned"].get("miou_before_finetune") or float("nan")),
            "cls_top1": col(lambda r: r.m["pruned"]["cls_top1"]),
            "cls_top1_ft": col(lambda r: _nan(r.top1_ft)),
            "kept_backbone": _mean_std_opt([kept_fraction(r.m, "backbone") for r in rs]),
            "kept_decoder": _mean_std_opt([kept_fraction(r.m, "decoder") for r in rs]),
            "sparse_miou": _mean_std_opt([r.sparse_miou for r in rs]),
            "prune_step_loss": _mean_std_opt([r.prune_step_loss for r in rs]),
            "removed_gamma_share": _mean_std_opt([r.removed_gamma_share for r in rs]),
        })
    return rows


def _pm(ms: tuple[float, float | None], scale: float = 100.0, fmt: str = "{:.2f}", sign: bool = False) -> str:
    mu, sd = ms
    s = ("{:+.2f}" if sign else fmt).format(scale * mu)
    return s if sd is None else f"{s} ± {fmt.format(scale * sd)}"


def _pm_opt(ms, scale: float = 100.0, fmt: str = "{:.2f}") -> str:
    """:func:`_pm`, or an empty cell for a value that some run lacks."""
    return "" if ms is None else _pm(ms, scale, fmt)


def _keep(g: dict) -> str:
    if g["target_kind"] == "channels":
        return f"{g['keep']:g}×"
    return f"{g['keep']:.3f}×" if g["keep_std"] is None else f"{g['keep']:.3f} ± {g['keep_std']:.3f}×"


def render_table(runs: list[RunRecord]) -> str:
    """Markdown: baseline(s), then one row per setting (mean ± std over seeds), then one row per run."""
    lines = []
    bases: dict[str, RunRecord] = {}
    for r in runs:
        bases.setdefault(r.baseline_id, r)
    lines += ["| baseline | mIoU (%) | params (M) | GFLOPs | latency (ms) | backbone top-1 after pre-training (%) |",
              "|---|---|---|---|---|---|"]
    for i, r in enumerate(bases.values()):
        b = r.m["baseline"]
        lines.append(f"| {r.cfg['model']['name']} #{i + 1} | {100 * b['miou']:.2f} | {b['params'] / 1e6:.3f} | "
                     f"{b['flops'] / 1e9:.3f} | {b['latency_ms']:.2f} | {100 * _nan(r.top1_base):.2f} |")
    lines += ["", "| method | keep | threshold | target | fine-tune | seeds | mIoU (%) | ΔmIoU | params (×) | FLOPs (×) | "
              "latency (×) | mIoU before FT (%) | mIoU after sparsity (%) | prune-step loss (pts) | removed Σ\\|γ\\| (%) | "
              "backbone top-1 after cls FT (%) | kept backbone / decoder (%) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    multi_base = len(bases) > 1
    base_no = {k: i + 1 for i, k in enumerate(bases)}
    for g in group_runs(runs):
        tag = f" (baseline #{base_no[g['baseline_id']]})" if multi_base else ""
        tag += f" [{g['variant']}]" if g["variant"] else ""
        lines.append(
            f"| {g['method']}{tag} | {_keep(g)} | {g['threshold']} | {g['target']} | {g['finetune']} | "
            f"{','.join(map(str, g['seeds']))} | {_pm(g['miou'])} | {_pm(g['delta_miou'], sign=True)} | "
            f"{_pm(g['params'], 1, '{:.2f}')} | {_pm(g['flops'], 1, '{:.2f}')} | {_pm(g['latency'], 1, '{:.2f}')} | "
            f"{_pm(g['miou_before_ft'])} | {_pm_opt(g['sparse_miou'])} | {_pm_opt(g['prune_step_loss'])} | "
            f"{_pm_opt(g['removed_gamma_share'])} | {_pm(g['cls_top1_ft'])}{' (no cls FT)' if g['finetune'] == 'seg only' else ''} | "
            f"{_pct0(g['kept_backbone'])} / {_pct0(g['kept_decoder'])} |")
    lines += ["", "Target: what each run was pruned to, a channel keep ratio (prune.keep_ratio) or a FLOPs ratio "
              "(prune.target_flops_ratio; its keep column is the keep ratio the search found, mean over seeds). "
              "Ratios are pruned / baseline of the same run; ± is the sample standard deviation over seeds. "
              "FLOPs: one multiply-add = 2 FLOPs. Latency: batch 1, median (see each run's report.md for threads). "
              "Backbone top-1: classification eval split, right after the classification stage (MTP paper, Table 5); "
              "(no cls FT): a seg-only run, whose pruned backbone had no classification fine-tuning. "
              "Prune-step loss: mIoU after sparsity training minus mIoU right after removal, in points (both "
              "single-scale); removed Σ|γ|: the share of the prunable units' Σ|γ| that the removal deleted. "
              "Empty cells: run folders made before these were recorded. [key=value]: runs that differ from the "
              "row of the same method and target in these settings (never pooled with it as seeds)."]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["run", "method", "keep_ratio", "threshold_mode", "finetune", "seed", "baseline_miou", "miou", "delta_miou",
              "pixel_acc", "baseline_params", "params", "params_ratio", "baseline_flops", "flops", "flops_ratio",
              "baseline_latency_ms", "latency_ms", "latency_ratio", "miou_before_finetune", "baseline_cls_top1",
              "cls_top1", "baseline_top1_after_pretrain", "top1_after_cls_finetune", "kept_backbone", "kept_decoder",
              "target", "target_flops_ratio", "flops_target_met", "round_to", "sparse_miou", "prune_step_loss",
              "removed_gamma_share", "variant"]


def write_csv(runs: list[RunRecord]) -> str:
    """CSV text with one line per run (:data:`CSV_FIELDS`); FLOPs in FLOPs (2 per multiply-add).

    ``target`` is ``flops <ratio>`` or ``channels <keep ratio>``; ``keep_ratio`` is the channel keep
    ratio used (with a FLOPs target, the one found); ``target_flops_ratio`` / ``flops_target_met`` are
    empty without a FLOPs target; ``sparse_miou`` (after sparsity training, before removal),
    ``prune_step_loss`` (``sparse_miou`` − ``miou_before_finetune``, a fraction like ``delta_miou``) and
    ``removed_gamma_share`` (0..1) are empty for run folders made before they were recorded; ``variant``
    as in :func:`group_runs` (empty for the setting's main group)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    variant = _variants(runs)
    for r in runs:
        b, p = r.m["baseline"], r.m["pruned"]
        w.writerow({"run": r.name, "method": r.method, "keep_ratio": r.keep, "threshold_mode": r.threshold,
                    "finetune": r.ft, "seed": r.seed, "baseline_miou": b["miou"], "miou": p["miou"],
                    "delta_miou": r.m["delta_miou"], "pixel_acc": p["pixel_acc"], "baseline_params": b["params"],
                    "params": p["params"], "params_ratio": r.m["ratios"]["params"], "baseline_flops": b["flops"],
                    "flops": p["flops"], "flops_ratio": r.m["ratios"]["flops"], "baseline_latency_ms": b["latency_ms"],
                    "latency_ms": p["latency_ms"], "latency_ratio": r.m["ratios"]["latency_ms"],
                    "miou_before_finetune": p.get("miou_before_finetune"), "baseline_cls_top1": b["cls_top1"],
                    "cls_top1": p["cls_top1"], "baseline_top1_after_pretrain": r.top1_base,
                    "top1_after_cls_finetune": r.top1_ft, "kept_backbone": kept_fraction(r.m, "backbone"),
                    "kept_decoder": kept_fraction(r.m, "decoder"),
                    "target": f"{r.target_kind[0]} {r.target_kind[1]:g}", "target_flops_ratio": r.target,
                    "flops_target_met": r.m.get("flops_target_met") if r.target is not None else None,
                    "round_to": r.round_to, "sparse_miou": r.sparse_miou, "prune_step_loss": r.prune_step_loss,
                    "removed_gamma_share": r.removed_gamma_share, "variant": variant.get(r.name, "")})
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _round_label(round_to: int) -> str:
    return f", widths ×{round_to}" if round_to > 1 else ""


def _label(r: RunRecord, variants: dict[str, str] | None = None) -> str:
    """Legend label of a run's setting; ``variants`` (run name -> :func:`group_runs`' variant) adds it."""
    thr = "" if r.method in ("uniform", "thinet", "fpgm") else f" {r.threshold}"
    ft = "" if r.ft == "cls+seg" else f" ({r.ft})"
    what = f"FLOPs {r.target:.2f}×" if r.target is not None else f"{r.keep:g}×"
    variant = (variants or {}).get(r.name, "")
    return (f"{r.method} {what}{thr}{ft}" + ("" if r.round_to == 1 else f" r{r.round_to}")
            + (f" [{variant}]" if variant else ""))


def _variants(runs: list[RunRecord]) -> dict[str, str]:
    """Run name -> its setting's variant label (:func:`group_runs`)."""
    return {name: g["variant"] for g in group_runs(runs) for name in g["runs"]}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points of (cost, quality) pairs: no other point has lower-or-equal
    cost and higher-or-equal quality with one of them strict. Sorted by cost."""
    idx = []
    for i, (c, q) in enumerate(points):
        dominated = any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for j, (c2, q2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def plot_pareto(runs: list[RunRecord], path: Path) -> None:
    """mIoU (%) vs GFLOPs; one marker per run, colour per method, baseline(s) as stars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    methods = sorted({r.method for r in runs})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    seen_base = set()
    for r in runs:
        if r.baseline_id not in seen_base:
            seen_base.add(r.baseline_id)
            ax.scatter(r.m["baseline"]["flops"] / 1e9, 100 * r.m["baseline"]["miou"], marker="*", s=160, c="k",
                       label="baseline" if len(seen_base) == 1 else None, zorder=3)
    labelled = set()
    for r in runs:  # circles: per-part (Ind) or per-layer thresholds; squares: one global (Uni) threshold
        ax.scatter(r.m["pruned"]["flops"] / 1e9, 100 * r.m["pruned"]["miou"], color=colors[r.method], alpha=0.85,
                   marker="s" if r.threshold == "uni" and r.method not in ("uniform", "thinet", "fpgm") else "o",
                   label=None if r.method in labelled else r.method, zorder=2)
        labelled.add(r.method)
    pts = [(r.m["pruned"]["flops"], r.m["pruned"]["miou"]) for r in runs]
    front = pareto_front(pts)
    ax.plot([pts[i][0] / 1e9 for i in front], [100 * pts[i][1] for i in front], "k--", lw=0.8, label="Pareto front", zorder=1)
    ax.set_xlabel("GFLOPs (1 multiply-add = 2 FLOPs)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_widths(runs: list[RunRecord], path: Path) -> None:
    """Figure 5 analog: output channels per conv layer (baseline bars, one line per setting)."""
    plt = _plt()
    reps = {}
    for r in runs:
        reps.setdefault(r.group_key, r)  # first seed of each setting
    reps, variants = list(reps.values()), _variants(runs)
    lw0 = reps[0].m["layer_widths"]["baseline"]
    layers = [n for n in lw0 if n.startswith("backbone.") and n != "backbone.fc"], [n for n in lw0 if not n.startswith("backbone.")]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(lw0)), 7.5))
    for ax, names, title in zip(axes, layers, ("backbone", "decoder (ASPP + head)")):
        x = range(len(names))
        ax.bar(x, [lw0[n][1] for n in names], color="0.85", label="baseline")
        for i, r in enumerate(reps):
            pw = r.m["layer_widths"]["pruned"]
            ax.plot(x, [pw.get(n, [0, 0])[1] for n in names], marker=".", lw=1, label=_label(r, variants),
                    color=plt.cm.tab10(i % 10))
        ax.set_xticks(list(x))
        ax.set_xticklabels([n.replace("backbone.", "").replace("classifier.", "") for n in names], rotation=90, fontsize=6)
        ax.set_ylabel("output channels")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _palette(num_classes: int, ds) -> list[tuple[int, int, int]]:
    pal = list(getattr(ds, "PALETTE", None) or [])
    if len(pal) < num_classes:
        import colorsys
        pal += [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / num_classes, 0.7, 0.9)) for i in range(len(pal), num_classes)]
    return pal


def plot_qualitative(runs: list[RunRecord], path: Path, n_images: int = 4) -> list[int]:
    """Figure 6 analog: rows = fixed eval images (evenly spaced indices), columns = input, ground
    truth, baseline, one pruned model per setting (first seed). Ignored pixels are black.
    Returns the dataset indices shown."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .data import IMAGENET_MEAN, IMAGENET_STD, build_seg_dataset
    from .pipeline import load_run_model
    plt = _plt()
    reps = {}
    for r in runs:
        reps.setdefault(r.group_key, r)
    reps, variants = list(reps.values()), _variants(runs)
    first = reps[0]
    dseg = first.cfg["data"]["seg"]
    ds = build_seg_dataset(dseg, first.cfg["eval"]["split"] or dseg["eval_split"], False, first.seed)
    k = first.m.get("num_classes") or len(first.m["baseline"]["per_class_iou"])
    pal = np.array(_palette(k, ds) + [(0, 0, 0)] * (256 - k), dtype=np.uint8)
    idx = sorted({int(round(i)) for i in np.linspace(0, len(ds) - 1, min(n_images, len(ds)))})
    models = [("baseline", load_run_model(first.path / "stages" / "02_train_seg")[0])]
    models += [(_label(r, variants), load_run_model(r.path / "stages" / "06_finetune_seg")[0]) for r in reps]
    cols = 2 + len(models)
    fig, axes = plt.subplots(len(idx), cols, figsize=(2.2 * cols, 1.8 * len(idx)), squeeze=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        for row, i in enumerate(idx):
            x, y = ds[i]
            h, w = y.shape[-2:]
            img = F.interpolate((x * std + mean)[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            panels = [img.clamp(0, 1).permute(1, 2, 0).numpy(), pal[y.numpy().astype(np.int64) % 256]]
            for _, model in models:
                model.eval()
                logits = F.interpolate(model(x[None]), size=(h, w), mode="bilinear", align_corners=False)
                panels.append(pal[logits.argmax(1)[0].numpy()])
            for c, (panel, title) in enumerate(zip(panels, ["input", "ground truth"] + [n for n, _ in models])):
                ax = axes[row][c]
                ax.imshow(panel)
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return idx


def _primary(runs: list[RunRecord], limit: int = 6) -> list[RunRecord]:
    """Runs for the qualitative grid: all settings if few, else the Ind / cls+seg runs at the
    smallest keep ratio (one per method)."""
    if len({r.group_key for r in runs}) <= limit:
        return runs
    pool = [r for r in runs if r.target is None] or runs  # channel-ratio runs share keep ratios
    kmin = min(r.keep for r in pool)
    sel = [r for r in pool if r.keep == kmin and r.ft == "cls+seg" and r.threshold == "ind"]
    return sel or runs[:limit]


def compare(paths: list[str | Path], out: str | Path, n_images: int = 4, plots: bool = True, log=print,
            eval_cls: bool = False) -> dict:
    """Write table.md, table.csv and (``plots``) pareto.png, widths.png, qualitative.png to ``out``.

    Returns {"runs": n, "settings": n, "files": [...]}.

    Raises:
        ConfigError / CheckpointError: see :func:`collect_runs`.
    """
    runs = collect_runs(paths, eval_cls)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = render_table(runs)
    atomic_write_bytes(out / "table.md", md.encode())
    atomic_write_bytes(out / "table.csv", write_csv(runs).encode())
    files = ["table.md", "table.csv"]
    if plots:
        # plots compare like with like: the runs pruned from the most common baseline
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.baseline_id] = counts.get(r.baseline_id, 0) + 1
        main_id = max(counts, key=counts.get)
        same = [r for r in runs if r.baseline_id == main_id]
        if len(same) < len(runs):
            log(f"plots: {len(runs) - len(same)} run(s) of another baseline left out of the plots: "
                f"{', '.join(r.name for r in runs if r.baseline_id != main_id)}")
        plot_pareto(same, out / "pareto.png")
        plot_widths(same, out / "widths.png")
        files += ["pareto.png", "widths.png"]
        if n_images > 0:
            shown = plot_qualitative(_primary(same), out / "qualitative.png", n_images)
            files.append("qualitative.png")
            log(f"qualitative grid: eval images {shown}")
    log(md)
    log(f"wrote {', '.join(str(out / f) for f in files)}")
    return {"runs": len(runs), "settings": len({r.group_key for r in runs}), "files": files}
