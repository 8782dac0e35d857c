"""Algorithm 1 end to end on a tiny synthetic setting, the run folder, resume and bad input."""
import json
import shutil
from pathlib import Path

import pytest
import yaml

from segprune.cli import main
from segprune.config import ConfigError, load_config

from conftest import TINY

def _write(tmp_path, cfg=TINY, name="tiny.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = _write(tmp)
    out = tmp / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return cfg, out


def test_run_folder_contents_and_metrics(finished_run):
    _, out = finished_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "mtp" and m["keep_ratio"] == 0.5 and m["threshold_mode"] == "ind"
    assert m["input_size"] == [32, 32]
    for key in ("baseline", "pruned"):
        for k in ("miou", "pixel_acc", "params", "flops", "macs", "latency_ms"):
            assert k in m[key]
        assert 0.0 <= m[key]["miou"] <= 1.0
        assert m[key]["flops"] == 2 * m[key]["macs"]
    assert m["pruned"]["params"] < 0.8 * m["baseline"]["params"]
    assert m["pruned"]["flops"] < m["baseline"]["flops"]
    kept = m["kept_per_part"]
    for part in ("backbone", "decoder"):  # Ind: each part keeps half of its prunable channels
        assert kept[part][0] == kept[part][1] // 2 + kept[part][1] % 2 or kept[part][0] == kept[part][1] // 2
    assert (out / "report.md").read_text().count("\n| pruned | ") == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["prune"]["keep_ratio"] == 0.5
    for st in ("01_pretrain_cls", "02_train_seg", "03_sparsity", "04_prune", "05_finetune_cls", "06_finetune_seg"):
        assert (out / "stages" / st / "done.json").exists()
        assert (out / "stages" / st / "model.safetensors").exists()
    arch = json.loads((out / "stages/06_finetune_seg/arch.json").read_text())
    units = arch["widths"]["units"]
    for part in ("backbone", "decoder"):
        assert sum(u["kept"] for u in units.values() if u["part"] == part) == kept[part][0]
        assert sum(u["channels"] for u in units.values() if u["part"] == part) == kept[part][1]


def test_prune_step_metrics_are_filled(finished_run, tmp_path):
    """Issue 15: mIoU after sparsity training (recorded by the sparsity stage), the prune-step loss and the
    removed share of Σ|γ| reach metrics.json and report.md; a run folder made before they existed gets nulls."""
    _, out = finished_run
    m = json.loads((out / "metrics.json").read_text())
    sp = json.loads((out / "stages/03_sparsity/done.json").read_text())["sparse_eval"]
    assert m["sparse"] == {"miou": sp["miou"], "pixel_acc": sp["pixel_acc"]}
    assert 0.0 <= m["sparse"]["miou"] <= 1.0 and 0.0 < m["sparse"]["pixel_acc"] <= 1.0
    assert m["prune_step_loss"] == pytest.approx(m["sparse"]["miou"] - m["pruned"]["miou_before_finetune"])
    share = m["removed_gamma_share"]
    # MTP's growing ℓ1 schedule drove every channel the budget removes to γ = 0 (magnitude: > 0, test_api)
    assert share["total"] == 0.0 and set(share["parts"]) == {"backbone", "decoder"}
    prune = json.loads((out / "stages/04_prune/done.json").read_text())
    assert prune["removed_gamma_share"] == share and prune["compensation"]["mode"] == "interior"
    assert m["removal_compensation"] == prune["compensation"]
    report = (out / "report.md").read_text()
    assert f"prune-step loss (that minus the mIoU right after removal, both single-scale): " \
           f"{100 * m['prune_step_loss']:.2f} points" in report
    assert f"Σ|γ| that the removal deletes: {100 * share['total']:.2f}%" in report
    # an older run folder: no sparse_eval, no removed_gamma_share -> nulls, "n/a" in the report
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for st, key in (("03_sparsity", "sparse_eval"), ("04_prune", "removed_gamma_share"), ("04_prune", "compensation")):
        f = old / "stages" / st / "done.json"
        f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != key}))
    shutil.rmtree(old / "stages/07_evaluate")
    (old / "metrics.json").unlink()
    assert main(["run", str(finished_run[0]), "--out", str(old), "--quiet"]) == 0
    m_old = json.loads((old / "metrics.json").read_text())
    assert m_old["sparse"] == {"miou": None, "pixel_acc": None} and m_old["prune_step_loss"] is None
    assert m_old["removed_gamma_share"] is None and m_old["pruned"]["miou"] == m["pruned"]["miou"]
    assert "prune-step loss (that minus the mIoU right after removal, both single-scale): n/a" in \
        (old / "report.md").read_text()


def test_evaluate_reproduces_recorded_miou(finished_run, capsys):
    _, out = finished_run
    assert main(["evaluate", str(out)]) == 0
    assert "reproduced exactly" in capsys.readouterr().out


def test_resume_skips_finished_stages(finished_run, tmp_path):
    cfg, out = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "stages" / "06_finetune_seg")
    before = {p: p.stat().st_mtime_ns for p in (copy / "stages").rglob("done.json") if "evaluate" not in str(p)}
    assert len(before) == 5
    logs = (copy / "logs" / "train_seg.log").read_text()
    assert main(["run", str(cfg), "--out", str(copy), "--quiet"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert (copy / "logs" / "train_seg.log").read_text() == logs          # not re-trained
    assert (copy / "stages" / "06_finetune_seg" / "done.json").exists()   # redone
    a = json.loads((out / "metrics.json").read_text())["pruned"]["miou"]
    b = json.loads((copy / "metrics.json").read_text())["pruned"]["miou"]
    assert a == b  # deterministic on CPU


def test_other_config_refused_and_nothing_overwritten(finished_run, tmp_path, capsys):
    cfg, out = finished_run
    snap = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--set", "prune.keep_ratio=0.75"]) == 2
    assert "another config" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snap


def test_stage_of_another_config_refused_without_config_yaml(finished_run, tmp_path, capsys):
    """config.yaml gone (deleted, or stage folders copied into a new --out): a finished stage whose recorded
    fingerprint is not this run's is refused with its done.json named, not silently reused, and nothing is written."""
    cfg, out = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "config.yaml").unlink()
    snap = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert main(["run", str(cfg), "--out", str(copy), "--quiet", "--set", "prune.keep_ratio=0.75"]) == 2
    err = capsys.readouterr().err
    # the growing ℓ1 schedule trains for the budget, so sparsity training is the first stage that differs
    assert "03_sparsity" in err and "done.json" in err and "another config" in err and "02_train_seg" not in err
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == snap
    # the same config still resumes from those stages: no training stage runs again
    trained = {p: p.stat().st_mtime_ns for p in (copy / "stages").rglob("done.json") if "evaluate" not in str(p)}
    assert main(["run", str(cfg), "--out", str(copy), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
    a, b = (json.loads((d / "metrics.json").read_text())["pruned"]["miou"] for d in (out, copy))
    assert a == b


def test_tampered_run_folder_files_are_named(finished_run, tmp_path, capsys):
    """A damaged config.yaml, done.json or arch.json inside a run folder: exit 2 with the file named,
    and the run folder left as it was."""
    cfg, out = finished_run

    def tampered(rel, text):
        d = tmp_path / rel.replace("/", "_")
        shutil.copytree(out, d)
        (d / rel).write_text(text)
        return d, {q: q.read_bytes() for q in d.rglob("*") if q.is_file()}

    d, snap = tampered("config.yaml", "model: [unclosed\n")
    for argv in (["run", str(cfg), "--out", str(d), "--quiet"], ["evaluate", str(d)],
                 ["compare", str(d), "--out", str(tmp_path / "cmp")]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "config.yaml" in err and "not valid YAML" in err, (argv, err)
    assert {q: q.read_bytes() for q in d.rglob("*") if q.is_file()} == snap

    d, snap = tampered("stages/04_prune/done.json", "{\"miou_before_finetune\": ")
    shutil.rmtree(d / "stages" / "05_finetune_cls")  # the resume has to load the prune stage
    snap = {q: b for q, b in snap.items() if "05_finetune_cls" not in str(q)}
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(d), "--quiet"]) == 2
    assert "04_prune/done.json" in capsys.readouterr().err
    assert {q: q.read_bytes() for q in d.rglob("*") if q.is_file() and "logs" not in q.parts} == \
        {q: b for q, b in snap.items() if "logs" not in q.parts}

    arch = json.loads((out / "stages/06_finetune_seg/arch.json").read_text())
    d, snap = tampered("stages/06_finetune_seg/arch.json", json.dumps({**arch, "format": "something-else"}))
    capsys.readouterr()
    assert main(["evaluate", str(d)]) == 2
    err = capsys.readouterr().err
    assert "06_finetune_seg/arch.json" in err and "not a segprune architecture file" in err


@pytest.mark.parametrize("override,needle", [
    ("prune.keep_ratio=1.5", "prune.keep_ratio=1.5"),
    ("prune.keep_ratio=0", "prune.keep_ratio=0"),
    ("prune.keep_rato=0.5", "prune.keep_rato: unknown key"),
    ("method.rho=0.9", "method.rho"),
    ("train.seg.epochs=-1", "train.seg.epochs"),
])
def test_bad_config_values(tmp_path, capsys, override, needle):
    cfg = _write(tmp_path)
    out = tmp_path / "o"
    assert main(["run", str(cfg), "--out", str(out), "--set", override]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_unknown_key_in_yaml_lists_every_bad_key(tmp_path):
    bad = json.loads(json.dumps(TINY))
    bad["prune"]["keep_ratios"] = 0.5
    bad["methd"] = {}
    bad["data"]["seg"]["batch_size"] = 1
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, bad))
    msg = str(exc.value)
    assert "prune.keep_ratios: unknown key" in msg and "methd: unknown key" in msg and "data.seg.batch_size" in msg
    assert "tiny.yaml" in msg


def test_missing_data_folder_is_named_before_writing(tmp_path, capsys):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["seg"] = {**cfg["data"]["seg"], "name": "camvid", "root": str(tmp_path / "no_camvid")}
    out = tmp_path / "o"
    assert main(["run", str(_write(tmp_path, cfg)), "--out", str(out)]) == 2
    assert "no_camvid" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("method", ["uniform", "slimming", "thinet", "fpgm", "magnitude"])
def test_baseline_methods_through_the_same_pipeline(tmp_path, method):
    cfg = json.loads(json.dumps(TINY))
    cfg["method"]["name"] = method
    cfg["train"]["seg"]["epochs"] = 1
    out = tmp_path / method
    assert main(["run", str(_write(tmp_path, cfg)), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == method
    assert m["pruned"]["params"] < 0.8 * m["baseline"]["params"]
    units = json.loads((out / "stages/04_prune/arch.json").read_text())["widths"]["units"]
    if method not in ("slimming", "magnitude"):  # per-layer methods keep round(p * C) of every unit
        assert all(u["kept"] == max(1, round(0.5 * u["channels"])) for u in units.values())
    if method == "magnitude":  # no sparsity training: the network before removal is the baseline
        assert m["sparse"]["miou"] == m["baseline"]["miou"] and m["sparse"]["pixel_acc"] == m["baseline"]["pixel_acc"]
        kept = m["kept_per_part"]  # Ind thresholds on the baseline's |γ|: half of each part
        assert all(abs(kept[p][0] - kept[p][1] / 2) <= 0.5 for p in ("backbone", "decoder"))


def test_resume_at_prune_stage_gives_same_widths_and_miou(finished_run, tmp_path):
    cfg, out = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for st in ("04_prune", "05_finetune_cls", "06_finetune_seg", "07_evaluate"):
        shutil.rmtree(copy / "stages" / st)
    assert main(["run", str(cfg), "--out", str(copy), "--quiet"]) == 0
    arch = lambda d: json.loads((d / "stages/06_finetune_seg/arch.json").read_text())["widths"]  # noqa: E731
    assert arch(copy) == arch(out)
    assert json.loads((copy / "metrics.json").read_text())["pruned"]["miou"] == \
        json.loads((out / "metrics.json").read_text())["pruned"]["miou"]


def test_run_folder_holds_no_pickles(finished_run):
    """Weights are safetensors, everything else JSON/YAML/text/Markdown: nothing a loader would unpickle."""
    _, out = finished_run
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".yaml", ".log", ".md"}, suffixes
    for p in out.rglob("*.safetensors"):
        assert not p.read_bytes()[8:9000].count(b"\x80\x04\x95")  # no pickle protocol-4 frame in the header


def test_no_torch_load_outside_the_safe_wrapper():
    """Every torch.load on a user path goes through checkpoint.torch_load_safe (weights_only=True)."""
    import re
    root = Path(__file__).resolve().parents[1] / "segprune"
    offenders = []
    for f in root.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\btorch\.load\(", line) and "weights_only=True" not in line:
                offenders.append(f"{f.relative_to(root)}:{i}")
    assert not offenders, offenders
