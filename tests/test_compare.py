"""`segprune compare` on fixture run folders: aggregation over seeds, ratios, CSV, Pareto front."""
import csv
import io
import json
import math

import pytest
import yaml

from segprune.cli import main
from segprune.compare import collect_runs, group_runs, pareto_front, render_table, write_csv

BASE = {"miou": 0.60, "pixel_acc": 0.9, "params": 1000, "flops": 2000, "macs": 1000, "latency_ms": 10.0, "cls_top1": 0.5}


def _run(root, name, method, keep, seed, miou, flops, params, lat, thr="ind", ft_cls=1, base=BASE, fp="base-a",
         round_to=None, method_opts=None):
    d = root / name
    (d / "stages" / "02_train_seg").mkdir(parents=True)
    (d / "stages" / "05_finetune_cls").mkdir(parents=True)
    (d / "stages" / "02_train_seg" / "done.json").write_text(json.dumps({"fingerprint": fp}))
    (d / "stages" / "05_finetune_cls" / "done.json").write_text(json.dumps({"top1": 0.25 + seed / 100}))
    cfg = {"seed": seed, "method": {"name": method, **(method_opts or {})}, "prune": {"keep_ratio": keep, "threshold_mode": thr},
           "finetune": {"cls": {"epochs": ft_cls}}}
    if round_to is not None:
        cfg["prune"]["round_to"] = round_to
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    pruned = {"miou": miou, "pixel_acc": 0.8, "params": params, "flops": flops, "macs": flops // 2, "latency_ms": lat,
              "cls_top1": 0.3, "miou_before_finetune": 0.1}
    m = {"method": method, "keep_ratio": keep, "threshold_mode": thr, "baseline": base, "pruned": pruned,
         "delta_miou": miou - base["miou"],
         "ratios": {k: pruned[k] / base[k] for k in ("params", "flops", "macs", "latency_ms")},
         "kept_per_part": {"backbone": [int(keep * 100), 100], "decoder": [int(keep * 40), 40]},
         "layer_widths": {"baseline": {}, "pruned": {}}}
    (d / "metrics.json").write_text(json.dumps(m))
    return d


@pytest.fixture
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    _run(root, "mtp_s0", "mtp", 0.5, 0, 0.58, 1000, 500, 7.0)
    _run(root, "mtp_s1", "mtp", 0.5, 1, 0.56, 1100, 520, 8.0)
    _run(root, "fpgm_s0", "fpgm", 0.5, 0, 0.50, 1200, 500, 9.0)
    _run(root, "mtp_uni_s0", "mtp", 0.5, 0, 0.55, 900, 450, 6.0, thr="uni")
    return root


def test_groups_average_seeds_with_sample_std(sweep_dir):
    runs = collect_runs([sweep_dir])
    assert len(runs) == 4
    groups = {(g["method"], g["threshold"]): g for g in group_runs(runs)}
    assert set(groups) == {("mtp", "ind"), ("fpgm", "-"), ("mtp", "uni")}
    g = groups[("mtp", "ind")]
    assert g["seeds"] == [0, 1]
    assert g["miou"][0] == pytest.approx(0.57) and g["miou"][1] == pytest.approx(math.sqrt(2) * 0.01)
    assert g["flops"][0] == pytest.approx((0.5 + 0.55) / 2)
    assert g["latency"][0] == pytest.approx(0.75)
    assert g["delta_miou"][0] == pytest.approx(-0.03)
    assert g["cls_top1_ft"][0] == pytest.approx(0.255)
    assert g["kept_backbone"][0] == pytest.approx(0.5) and g["kept_decoder"][0] == pytest.approx(0.5)
    assert groups[("fpgm", "-")]["miou"][1] is None  # one seed: no std


def test_rounded_widths_are_a_setting_of_their_own(sweep_dir):
    """prune.round_to runs are not pooled with the unrounded runs of the same method and ratio."""
    _run(sweep_dir, "mtp_r8_s0", "mtp", 0.5, 0, 0.40, 1000, 500, 7.0, round_to=8)
    runs = collect_runs([sweep_dir])
    groups = {(g["method"], g["threshold"], g["round_to"]): g for g in group_runs(runs)}
    assert groups[("mtp", "ind", 1)]["seeds"] == [0, 1] and groups[("mtp", "ind", 1)]["miou"][0] == pytest.approx(0.57)
    assert groups[("mtp", "ind", 8)]["runs"] == ["mtp_r8_s0"] and groups[("mtp", "ind", 8)]["target"].endswith("widths ×8")
    assert "channels 0.5×, widths ×8" in render_table(runs)
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(write_csv(runs)))}
    assert rows["mtp_r8_s0"]["round_to"] == "8" and rows["mtp_s0"]["round_to"] == "1"


def test_an_ablation_is_a_row_of_its_own_not_a_seed(sweep_dir):
    """Runs that differ in a hyper-parameter besides the seed (here MTP's mu_max) are never pooled as seeds,
    and the row names the setting that differs; seeds 0 and 1 of the default still pool."""
    _run(sweep_dir, "mtp_mumax2_s0", "mtp", 0.5, 0, 0.40, 1000, 500, 7.0, method_opts={"mu_max": 2.0})
    runs = collect_runs([sweep_dir])
    mtp = {g["variant"]: g for g in group_runs(runs) if g["method"] == "mtp" and g["threshold"] == "ind"}
    assert set(mtp) == {"", "method.mu_max=2.0"}
    assert mtp[""]["seeds"] == [0, 1] and mtp[""]["miou"][0] == pytest.approx(0.57)
    assert mtp["method.mu_max=2.0"]["runs"] == ["mtp_mumax2_s0"] and mtp["method.mu_max=2.0"]["miou"][1] is None
    assert "| mtp [method.mu_max=2.0] | 0.5× | ind" in render_table(runs)
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(write_csv(runs)))}
    assert rows["mtp_mumax2_s0"]["variant"] == "method.mu_max=2.0" and rows["mtp_s1"]["variant"] == ""


def test_markdown_and_csv_tables(sweep_dir):
    runs = collect_runs([sweep_dir])
    md = render_table(runs)
    row = next(line for line in md.splitlines() if line.startswith("| mtp | 0.5× | ind"))
    assert "57.00 ± 1.41" in row and "-3.00 ± 1.41" in row and "| 0.53 ± 0.04 |" in row
    rows = list(csv.DictReader(io.StringIO(write_csv(runs))))
    assert len(rows) == 4
    fp = next(r for r in rows if r["run"] == "fpgm_s0")
    assert float(fp["flops_ratio"]) == pytest.approx(0.6) and float(fp["latency_ratio"]) == pytest.approx(0.9)
    assert float(fp["params_ratio"]) == pytest.approx(0.5)


def test_seg_only_row_marks_its_backbone_top1_as_without_cls_finetuning(sweep_dir):
    """A seg-only run's "backbone top-1 after cls FT" is its pruned backbone without any classification
    fine-tuning; the cell says so, and only in that row."""
    _run(sweep_dir, "mtp_segonly_s0", "mtp", 0.5, 0, 0.54, 1000, 500, 7.0, ft_cls=0)
    md = render_table(collect_runs([sweep_dir]))
    seg_only = [line for line in md.splitlines() if "| seg only |" in line]
    assert len(seg_only) == 1 and "25.00 (no cls FT) |" in seg_only[0]
    assert sum("(no cls FT) |" in line for line in md.splitlines()) == 1


def test_two_baselines_are_kept_apart(sweep_dir):
    other = dict(BASE, miou=0.7, flops=4000)
    _run(sweep_dir, "mtp_other", "mtp", 0.5, 0, 0.69, 2000, 500, 7.0, base=other, fp="base-b")
    md = render_table(collect_runs([sweep_dir]))
    assert "baseline #2" in md and md.count("| mtp (baseline #") == 3


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.6), (1.5, 0.4), (3.0, 0.6), (0.5, 0.3)]
    assert pareto_front(pts) == [4, 0, 1]


def test_cli_writes_tables_and_names_bad_folder(sweep_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(sweep_dir), "--out", str(out), "--no-plots"]) == 0
    assert (out / "table.md").read_text().startswith("| baseline |")
    assert len((out / "table.csv").read_text().splitlines()) == 5
    assert main(["compare", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


def test_prune_step_columns_and_old_folders_give_empty_cells(sweep_dir):
    """sparse mIoU, prune-step loss (points) and the removed Σ|γ| share: filled from metrics.json where
    recorded, empty cells for run folders made before they existed (the fixture's other runs)."""
    d = _run(sweep_dir, "magnitude_s0", "magnitude", 0.5, 0, 0.52, 1000, 500, 7.0)
    m = json.loads((d / "metrics.json").read_text())
    m["sparse"] = {"miou": 0.6, "pixel_acc": 0.9}
    m["prune_step_loss"] = 0.6 - m["pruned"]["miou_before_finetune"]
    m["removed_gamma_share"] = {"total": 0.25, "parts": {"backbone": 0.2, "decoder": 0.3}}
    (d / "metrics.json").write_text(json.dumps(m))
    runs = collect_runs([sweep_dir])
    md = render_table(runs)
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    cells = lambda line: [c.strip() for c in line.replace("\\|", "¦").strip("|").split("|")]  # noqa: E731
    cols = cells(header)
    assert "prune-step loss (pts)" in cols and "removed Σ¦γ¦ (%)" in cols
    row = dict(zip(cols, cells(next(line for line in md.splitlines() if line.startswith("| magnitude |")))))
    assert row["mIoU after sparsity (%)"] == "60.00" and row["prune-step loss (pts)"] == "50.00"
    assert row["removed Σ¦γ¦ (%)"] == "25.00"
    old = dict(zip(cols, cells(next(line for line in md.splitlines() if line.startswith("| fpgm |")))))
    assert old["prune-step loss (pts)"] == "" and old["removed Σ¦γ¦ (%)"] == "" and old["mIoU after sparsity (%)"] == ""
    assert all(len(cells(line)) == len(cols) for line in md.splitlines() if line.startswith("| ") and "|---" not in line
               and not line.startswith("| baseline") and not line.startswith("| deeplab"))
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(write_csv(runs)))}
    assert float(rows["magnitude_s0"]["prune_step_loss"]) == pytest.approx(0.5)
    assert float(rows["magnitude_s0"]["removed_gamma_share"]) == pytest.approx(0.25)
    assert float(rows["magnitude_s0"]["sparse_miou"]) == pytest.approx(0.6)
    assert rows["fpgm_s0"]["prune_step_loss"] == rows["fpgm_s0"]["removed_gamma_share"] == rows["fpgm_s0"]["sparse_miou"] == ""
    # a run with the sparse mIoU but without the prune_step_loss key: computed from miou_before_finetune
    del m["prune_step_loss"]
    (d / "metrics.json").write_text(json.dumps(m))
    assert collect_runs([d])[0].prune_step_loss == pytest.approx(0.5)


def test_a_part_without_prunable_units_gives_a_dash(tmp_path):
    """A run whose decoder had no prunable unit (torchvision LRASPP's gated head, smp Segformer's
    LayerNorm encoder): kept_per_part lacks that part; compare shows "–" and an empty CSV cell."""
    root = tmp_path / "runs"
    d = _run(root, "lraspp_fpgm", "fpgm", 0.5, 0, 0.35, 1000, 500, 9.0)
    m = json.loads((d / "metrics.json").read_text())
    m["kept_per_part"] = {"backbone": [2980, 5960]}
    (d / "metrics.json").write_text(json.dumps(m))
    runs = collect_runs([root])
    g = group_runs(runs)[0]
    assert g["kept_decoder"] is None and g["kept_backbone"][0] == pytest.approx(0.5)
    row = next(line for line in render_table(runs).splitlines() if line.startswith("| fpgm | 0.5×"))
    assert row.endswith("| 50 / – |")
    (row,) = csv.DictReader(io.StringIO(write_csv(runs)))
    assert row["kept_decoder"] == "" and float(row["kept_backbone"]) == pytest.approx(0.5)
