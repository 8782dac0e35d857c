"""Issue 15: does sparsity training sparsify? Runs of the demo config and the network at every stage.

    # a demo run with overrides, adopting the finished baseline stages (pretrain_cls, train_seg) of
    # another demo run folder (their fingerprints do not depend on the method keys)
    python benchmarks/sparsity_demo.py run /tmp/demo15/new_mtp --share /tmp/demo_before
    python benchmarks/sparsity_demo.py run /tmp/demo15/new_slimming --share /tmp/demo_before --set method.name=slimming
    # mIoU of the baseline, after sparsity training, after removal (the prune stage's network, and the
    # sparse network with the removed channels' γ set to 0 = an exact β-compensated removal), final;
    # γ quantiles; share of Σ|γ| removed; overlap of the removed channels with the magnitude control's
    # (baseline |γ|, same budget); MTP's ||W1 - W3|| / ||W3|| and Spearman(γ1, γ3)
    python benchmarks/sparsity_demo.py eval /tmp/demo15/new_mtp /tmp/demo15/new_slimming
    # only the selection statistics (no evaluation; any run folder, e.g. the CamVid reference)
    python benchmarks/sparsity_demo.py overlap runs/repro15/mtp_k0.5_s0 runs/repro15/slimming_k0.5_s0
    # capacity check: the widths a run's prune stage chose (or the full network), randomly initialised
    # and trained with the baseline's schedule (classification pre-training + segmentation training)
    python benchmarks/sparsity_demo.py scratch /tmp/demo15/scratch_pruned --widths /tmp/demo_final/stages/04_prune
    python benchmarks/sparsity_demo.py scratch /tmp/demo15/scratch_full

Prints one JSON object per run folder, then a markdown table. Single-threaded (``threads=1``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _run(args) -> None:
    from segprune.config import apply_overrides, demo_config, validate
    from segprune.pipeline import Pipeline
    cfg = demo_config()
    apply_overrides(cfg, list(args.set) + ["threads=1"])
    validate(cfg)
    t = time.perf_counter()
    Pipeline(cfg, args.out, quiet=True, share=[args.share] if args.share else None).run(stop_after=args.stop_after)
    print(f"{args.out}: {time.perf_counter() - t:.0f} s")


def _removed(scores: dict, units: list, prune: dict) -> dict[str, torch.Tensor]:
    from segprune.pruning.thresholds import round_kept, select_channels
    kept = round_kept(select_channels(scores, {u.name: u.part for u in units}, prune["keep_ratio"],
                                      prune["threshold_mode"], prune["min_channels"]), scores, prune.get("round_to", 1))
    out = {}
    for u in units:
        mask = torch.ones(u.channels, dtype=torch.bool)
        mask[kept[u.name]] = False
        out[u.name] = mask
    return out


def _selection_stats(cfg: dict, run: Path, base, sparse) -> dict:
    """Which channels the run's prune step removes (its scores at its budget) against the magnitude
    control's (baseline |γ|, same budget): γ quantiles of the scores, the share of Σ|γ| removed, the max
    removed score and the overlap of the removed sets; plus ``_removed`` (unit -> bool mask (C,)) and
    ``_units`` for the caller. No evaluation: cheap on a full-size run."""
    from segprune.checkpoint import load_state_dict
    from segprune.pipeline import stage_dir
    from segprune.pruning import build_graph, discover_units, unit_gammas
    p = cfg["prune"]
    units = discover_units(sparse, build_graph(sparse, tuple(cfg["data"]["seg"]["input_size"])), p["prune_coupled"])
    d = stage_dir(run, "sparsity")
    f = d / "method_state.safetensors"
    scores = load_state_dict(f if f.is_file() else d / "scores.safetensors")
    scores = {u.name: scores[u.name].float() for u in units}
    removed = _removed(scores, units, p)
    magnitude = _removed(unit_gammas(base, units), units, p)
    allv = torch.cat([s.flatten() for s in scores.values()]).double()
    n_rem = sum(int(m.sum()) for m in removed.values())
    out = {"gamma_q10": round(float(allv.quantile(0.1)), 4), "gamma_q50": round(float(allv.quantile(0.5)), 4),
           "removed_share_of_sum_gamma": round(sum(float(scores[n][m].sum()) for n, m in removed.items())
                                               / float(allv.sum()), 4),
           "removed_max_gamma": round(max(float(scores[n][m].max()) for n, m in removed.items() if m.any()), 4),
           "overlap_with_magnitude": round(sum(int((removed[n] & magnitude[n]).sum()) for n in removed) / n_rem, 3),
           "_removed": removed, "_units": units}
    done = json.loads((d / "done.json").read_text())
    for k in ("mu", "gap_rel", "spearman_gamma13"):
        if k in done:
            out[k] = done[k]
    return out


def _overlap(args) -> None:
    from segprune.config import read_run_config
    from segprune.pipeline import load_run_model, stage_dir
    torch.set_num_threads(1)
    for run in map(Path, args.runs):
        cfg = read_run_config(run)
        base, _ = load_run_model(stage_dir(run, "train_seg"))
        sparse, _ = load_run_model(stage_dir(run, "sparsity"))
        st = _selection_stats(cfg, run, base, sparse)
        st.pop("_removed"), st.pop("_units")
        print(json.dumps({"run": run.name, "method": cfg["method"]["name"], **st}), flush=True)


def _eval(args) -> None:
    from segprune.config import read_run_config
    from segprune.engine.evaluate import evaluate_segmentation
    from segprune.pipeline import Pipeline, load_run_model, stage_dir
    torch.set_num_threads(1)
    rows = []
    for run in map(Path, args.runs):
        cfg = read_run_config(run)
        pipe = Pipeline(cfg, run, quiet=True)
        loader = pipe._eval_loaders()[0]

        def miou(m):
            return round(100 * evaluate_segmentation(m.eval(), loader, pipe.num_classes, pipe.ignore_index)["miou"], 2)
        raw = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
        out = {"run": run.name, "method": cfg["method"]["name"],
               "l1_schedule": (raw.get("method") or {}).get("l1_schedule", "(shipped: constant)")}
        base, _ = load_run_model(stage_dir(run, "train_seg"))
        out["baseline"] = miou(base)
        sparse, _ = load_run_model(stage_dir(run, "sparsity"))
        out["after_sparsity"] = miou(sparse)
        pruned_dir = stage_dir(run, "prune")
        if (pruned_dir / "done.json").is_file():
            out["after_removal"] = miou(load_run_model(pruned_dir)[0])
        out.update(_selection_stats(cfg, run, base, sparse))
        mods = dict(sparse.named_modules())
        removed = out.pop("_removed")
        with torch.no_grad():          # exact removal with β compensation = the removed γ at 0, β kept
            for u in out.pop("_units"):
                for b in u.bns:
                    mods[b].weight[removed[u.name]] = 0.0
        out["after_removal_exact"] = miou(sparse)
        mf = run / "metrics.json"
        if mf.is_file():
            mt = json.loads(mf.read_text())
            out["final"] = round(100 * mt["pruned"]["miou"], 2)
            out["flops_ratio"] = round(mt["pruned"]["flops"] / mt["baseline"]["flops"], 4)
        print(json.dumps(out), flush=True)
        rows.append(out)
    cols = ["run", "method", "l1_schedule", "baseline", "after_sparsity", "after_removal", "after_removal_exact", "final",
            "gamma_q10", "gamma_q50", "removed_share_of_sum_gamma", "overlap_with_magnitude"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def _scratch(args) -> None:
    """The baseline's two stages (Pipeline.run up to train_seg) on a network built at ``--widths``
    (an ``arch.json``'s widths; none = the full network) with every layer's default initialisation
    (``reset_parameters``; applied to the full network too, so that both differ only in width).
    The folder's stages carry the demo baseline's fingerprints but not its network: never pass it to
    ``run --share``."""
    import segprune.pipeline as pipeline
    from segprune.checkpoint import load_json, save_json
    from segprune.config import apply_overrides, demo_config, validate
    from segprune.engine.evaluate import evaluate_segmentation
    from segprune.pruning import apply_widths
    cfg = demo_config()
    apply_overrides(cfg, list(args.set) + ["threads=1"])
    validate(cfg)
    widths = load_json(Path(args.widths) / "arch.json")["widths"] if args.widths else None
    build = pipeline.build_model

    def build_at_widths(*a, **k):
        m = build(*a, **k)
        if widths:
            apply_widths(m, widths, source=args.widths)
        for mod in m.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        return m

    t = time.perf_counter()
    p = pipeline.Pipeline(cfg, args.out, quiet=True)
    if not (pipeline.stage_dir(args.out, "train_seg") / "done.json").is_file():
        pipeline.build_model = build_at_widths
        try:
            p.run(stop_after="train_seg")
        finally:
            pipeline.build_model = build
        if widths:  # the stages recorded the full architecture: record the widths their weights have
            for stage in ("pretrain_cls", "train_seg"):
                f = pipeline.stage_dir(args.out, stage) / "arch.json"
                save_json(f, {**load_json(f), "widths": widths})
    model, _ = pipeline.load_run_model(pipeline.stage_dir(args.out, "train_seg"))
    r = evaluate_segmentation(model.eval(), p._eval_loaders()[0], p.num_classes, p.ignore_index)
    print(json.dumps({"run": args.out, "widths": args.widths, "params": sum(t.numel() for t in model.parameters()),
                      "miou": round(100 * r["miou"], 2), "wall_s": round(time.perf_counter() - t)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the demo config with overrides")
    r.add_argument("out")
    r.add_argument("--share", default=None, help="a run folder whose finished stages with equal fingerprints are adopted")
    r.add_argument("--set", nargs="*", default=[], help="key=value overrides of the demo config")
    r.add_argument("--stop-after", default=None, help="last stage to run (e.g. prune)")
    e = sub.add_parser("eval", help="evaluate every stage of run folders")
    e.add_argument("runs", nargs="+")
    o = sub.add_parser("overlap", help="removed channels vs the magnitude control's, without evaluating (full-size runs)")
    o.add_argument("runs", nargs="+")
    c = sub.add_parser("scratch", help="a network at a run's pruned widths (or full) trained from random init "
                                       "with the baseline's schedule")
    c.add_argument("out")
    c.add_argument("--widths", default=None, help="a stage folder whose arch.json widths to build (e.g. <run>/stages/04_prune)")
    c.add_argument("--set", nargs="*", default=[], help="key=value overrides of the demo config")
    args = ap.parse_args()
    {"run": _run, "eval": _eval, "overlap": _overlap, "scratch": _scratch}[args.cmd](args)


if __name__ == "__main__":
    main()
