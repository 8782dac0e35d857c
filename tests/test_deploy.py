"""ONNX export of a run's models (checked against PyTorch) and the eager / ONNX Runtime benchmark."""
import importlib.util
import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from conftest import TINY as _PIPELINE_TINY  # the shared tiny synthetic setting
from segprune.cli import main
from segprune.config import DEFAULTS, ConfigError, merge
from segprune.deploy import eval_images, find_run
from segprune.pipeline import load_run_model

TINY = copy.deepcopy(_PIPELINE_TINY)
TINY["train"]["seg"]["epochs"] = 1
TINY["eval"] = {'latency_runs': 1, 'latency_warmup': 0}
K, H, W = 5, 32, 32  # synthetic: num_kinds 4 + background


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("deploy")
    cfg = tmp / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return out


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_runs_in_onnxruntime_with_dynamic_batch_and_matches_pytorch(run, tmp_path, capsys):
    f = tmp_path / "sub" / "pruned.onnx"
    assert main(["export", str(run), "--onnx", str(f), "--images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "opset 17" in printed and f"(N, 3, {H}, {W})" in printed and "OK" in printed
    side = json.loads(Path(str(f) + ".json").read_text())
    assert side["opset"] == 17 and side["input_size"] == [H, W] and side["model"] == "pruned"
    assert [o.version for o in onnx.load(str(f)).opset_import if o.domain in ("", "ai.onnx")] == [17]
    chk = side["check"]
    assert chk["images"] == 4 and chk["pixels"] == 4 * H * W and chk["ok"] is True
    assert chk["max_abs_diff"] < 1e-3 and chk["agreement"] > 0.99

    # independent check: real eval images through onnxruntime vs the model rebuilt from the run folder
    model, _ = load_run_model(run / "stages" / "06_finetune_seg")
    model.eval()
    assert side["params"] == sum(p.numel() for p in model.parameters())
    cfg = merge(DEFAULTS, yaml.safe_load((run / "config.yaml").read_text()))
    x, _ = eval_images(cfg, 3)
    sess = _session(f)
    assert sess.get_inputs()[0].shape[0] == "batch"  # symbolic batch axis
    for n in (1, 3):
        got = sess.run(None, {"images": x[:n].numpy()})[0]
        assert got.shape == (n, K, H, W) and got.dtype == np.float32
        with torch.no_grad():
            ref = model(x[:n]).numpy()
        assert np.abs(got - ref).max() < 1e-3
        assert (got.argmax(1) == ref.argmax(1)).mean() > 0.99


def test_export_baseline_and_other_opset(run, tmp_path):
    f = tmp_path / "base.onnx"
    assert main(["export", str(run), "--onnx", str(f), "--opset", "13", "--images", "100", "--baseline"]) == 0
    side = json.loads((tmp_path / "base.onnx.json").read_text())
    assert side["opset"] == 13 and side["model"] == "baseline" and side["stage"] == "02_train_seg"
    assert side["check"]["images"] == TINY["data"]["seg"]["num_eval"]  # capped at the split size
    assert [o.version for o in onnx.load(str(f)).opset_import if o.domain in ("", "ai.onnx")] == [13]
    metrics = json.loads((run / "metrics.json").read_text())
    assert side["params"] == metrics["baseline"]["params"] and side["flops"] == metrics["baseline"]["flops"]
    assert _session(f).run(None, {"images": np.zeros((2, 3, H, W), np.float32)})[0].shape == (2, K, H, W)


def test_benchmark_json_entries_and_ratios(run, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["benchmark", str(run), "--batch", "1", "--batch", "2", "--runs", "3", "--warmup", "1",
            "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| pruned | 2 |" in printed and "onnxruntime " + ort.__version__ in printed
    res = json.loads((out / "benchmark.json").read_text())
    assert res["threads"] == 1 and res["input_size"] == [H, W] and res["batches"] == [1, 2]
    assert res["onnxruntime_version"] == ort.__version__ and res["cpu"]
    assert set(res["models"]) == {"baseline", "pruned"}
    for m in res["models"].values():
        assert m["flops"] == 2 * m["macs"]
        for b in ("1", "2"):
            for be in ("eager", "ort"):
                lat = m["latency"][b][be]
                assert lat["runs"] >= 3 and lat["warmup"] == 1 and lat["threads"] == 1 and lat["batch_size"] == int(b)
                assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    b, p = res["models"]["baseline"], res["models"]["pruned"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (b["flops"], p["flops"]) == (metrics["baseline"]["flops"], metrics["pruned"]["flops"])
    for bs in ("1", "2"):
        r = res["ratios"][bs]
        assert r["flops"] == pytest.approx(p["flops"] / b["flops"], rel=1e-12) and r["flops"] < 1
        for be in ("eager", "ort"):
            assert r[be] == pytest.approx(p["latency"][bs][be]["median_ms"] / b["latency"][bs][be]["median_ms"])
    md = (out / "benchmark.md").read_text()
    assert "pruned / baseline" in md and "1 thread" in md and f"{H}x{W}" in md and res["cpu"] in md


def test_benchmark_of_a_config_without_onnx(run, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "cb"
    assert main(["benchmark", str(cfg), "--batch", "1", "--runs", "2", "--warmup", "0", "--no-onnx",
                 "--out", str(out)]) == 0
    res = json.loads((out / "benchmark.json").read_text())
    assert res["kind"] == "config" and list(res["models"]) == ["unpruned"] and "ratios" not in res
    lat = res["models"]["unpruned"]["latency"]["1"]
    assert "ort" not in lat and lat["eager"]["runs"] == 2 and res["threads"] == 1
    base = json.loads((run / "metrics.json").read_text())["baseline"]
    assert res["models"]["unpruned"]["flops"] == base["flops"]  # same architecture as the run's baseline


@pytest.mark.parametrize("cmd", [["export", "--onnx", "x.onnx"], ["benchmark", "--runs", "1"], ["evaluate"]])
def test_not_a_run_folder_exit_2_names_path(tmp_path, capsys, cmd):
    bad = tmp_path / "not_a_run"
    bad.mkdir()
    assert main([cmd[0], str(bad), *cmd[1:]]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not a segprune run folder" in err
    unfinished = tmp_path / "unfinished"
    (unfinished / "stages" / "02_train_seg").mkdir(parents=True)
    (unfinished / "config.yaml").write_text(yaml.safe_dump(TINY))
    assert main([cmd[0], str(unfinished), *cmd[1:]]) == 2
    err = capsys.readouterr().err
    assert str(unfinished) in err and "fine-tuning" in err
    if cmd[0] != "evaluate":
        with pytest.raises(ConfigError, match="not_a_run"):
            find_run(bad)


def test_export_bad_arguments_and_a_failing_check(run, tmp_path, capsys, monkeypatch):
    """--images 0 and an opset outside 11..20 exit 2 naming the value, before anything is written;
    an export whose ONNX Runtime check fails exits 1 and still records why."""
    import segprune.deploy as deploy
    f = tmp_path / "m.onnx"
    for argv, needle in ((["--images", "0"], "--images 0"), (["--opset", "9"], "opset 9")):
        assert main(["export", str(run), "--onnx", str(f), *argv]) == 2
        assert needle in capsys.readouterr().err and not f.exists()
    monkeypatch.setattr(deploy, "CHECK_ATOL", -1.0)  # no logit difference can pass
    assert main(["export", str(run), "--onnx", str(f), "--images", "1"]) == 1
    assert "FAILED" in capsys.readouterr().out
    rec = json.loads(deploy.sidecar_path(f).read_text())
    assert rec["check"]["ok"] is False and rec["check"]["atol"] == -1.0


def test_ctrl_c_exits_130_with_the_resume_note(tmp_path, capsys, monkeypatch):
    import segprune.compare as compare_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(compare_mod, "compare", interrupted)
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "c")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_latency_script_goal_column(run, tmp_path):
    spec = importlib.util.spec_from_file_location("latency_bench", Path(__file__).parents[1] / "benchmarks" / "latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "lat" / "latency.md"
    assert mod.main([str(run), "--out", str(out), "--commit", "abc123", "--command", "pytest", "--batch", "1",
                     "--runs", "2", "--warmup", "0", "--threads", "1"]) == 0
    md = out.read_text()
    assert "abc123" in md and "`pytest`" in md and "latency ratio ≤ FLOPs ratio + 0.05" in md
    raw = json.loads(out.with_suffix(".json").read_text())
    (row,) = raw["runs"][0]["rows"]
    assert row["method"] == "mtp" and row["batch"] == 1
    for be in ("eager", "ort"):
        d = row[be]
        assert d["ratio"] == pytest.approx(d["pruned_ms"] / d["baseline_ms"])
        assert d["goal"] == ("yes" if d["ratio"] <= row["flops_ratio"] + 0.05 else "no")
        assert f"{d['ratio']:.3f} | **{d['goal']}**" in md
    assert mod.goal(0.59, 0.55) == "yes" and mod.goal(0.61, 0.55) == "no" and mod.goal(None, 0.5) is None


def test_benchmark_takes_the_pruning_stage_of_an_unfinished_run(run, tmp_path, capsys):
    """Latency depends on widths only: a run stopped after pruning is benchmarked, but not exported."""
    import shutil
    part = tmp_path / "part"
    shutil.copytree(run, part)
    for st in ("05_finetune_cls", "06_finetune_seg", "07_evaluate"):
        shutil.rmtree(part / "stages" / st)
    out = tmp_path / "b"
    assert main(["benchmark", str(part), "--batch", "1", "--runs", "2", "--warmup", "0", "--no-onnx",
                 "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((out / "benchmark.json").read_text())
    assert res["models"]["pruned"]["source"].endswith("04_prune")
    full = json.loads((run / "metrics.json").read_text())["pruned"]
    assert (res["models"]["pruned"]["params"], res["models"]["pruned"]["flops"]) == (full["params"], full["flops"])
    capsys.readouterr()
    assert main(["export", str(part), "--onnx", str(tmp_path / "x.onnx")]) == 2
    assert "fine-tuning" in capsys.readouterr().err


def test_interleaved_latency_alternates_models_and_pools_rounds():
    """A/B timing in alternating rounds: the order of calls is A B B A A ..., every time is pooled."""
    from segprune.deploy import interleaved_latency
    calls = []

    def fake(name, ms):
        def measure(n, w):
            calls.append((name, n, w))
            return {"median_ms": -1.0, "times_ms": [ms + i for i in range(n)], "batch_size": 1}
        return measure
    out = interleaved_latency({"a": fake("a", 10.0), "b": fake("b", 20.0)}, runs=9, warmup=3, rounds=3)
    assert calls[:2] == [("a", 1, 2), ("b", 1, 2)]  # warm-up: 2 untimed + 1 discarded each
    assert [c[0] for c in calls[2:]] == ["a", "b", "b", "a", "a", "b"] and all(c[1:] == (3, 0) for c in calls[2:])
    assert out["a"]["runs"] == 9 and out["a"]["rounds"] == 3 and out["a"]["warmup"] == 3
    assert out["a"]["median_ms"] == 11.0 and out["b"]["min_ms"] == 20.0 and "times_ms" not in out["a"]
    with pytest.raises(ValueError):
        interleaved_latency({"a": fake("a", 1.0)}, runs=0, warmup=0)


def test_benchmark_models_times_modules_given_directly():
    """benchmark_models (benchmarks/latency.py --model): two modules, eager and ORT, ratios from the medians;
    FLOPs per image at the given size (a net with half the hidden channels: 0.5x FLOPs in its 1x1 convs)."""
    from segprune.deploy import benchmark_models

    def net(c):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, c, 1), torch.nn.ReLU(), torch.nn.Conv2d(c, 4, 1))

    res = benchmark_models({"baseline": net(16), "pruned": net(8)}, (12, 20), batches=[1, 2], runs=2, warmup=1,
                           threads=1, onnx=True)
    assert res["input_size"] == [12, 20] and res["threads"] == 1 and res["kind"] == "models"
    flops = {k: res["models"][k]["flops"] for k in ("baseline", "pruned")}
    assert flops == {"baseline": 2 * 12 * 20 * (3 * 16 + 16 * 4), "pruned": 2 * 12 * 20 * (3 * 8 + 8 * 4)}
    for b in ("1", "2"):
        r = res["ratios"][b]
        assert r["flops"] == flops["pruned"] / flops["baseline"]
        for be in ("eager", "ort"):
            lat = {k: res["models"][k]["latency"][b][be]["median_ms"] for k in ("baseline", "pruned")}
            assert r[be] == lat["pruned"] / lat["baseline"] and min(lat.values()) > 0
    with pytest.raises(ValueError, match="input size"):
        benchmark_models({"baseline": net(4)}, (0, 8), onnx=False)


def test_benchmark_cuda_graph_refused_on_the_cpu_and_rendered_when_present(run, tmp_path, capsys):
    """--cuda-graph on the CPU: a clear error before anything is written. A result holding CUDA-graph
    timings (as written on a GPU) renders them as their own column and ratio."""
    from segprune.deploy import benchmark_models, render_benchmark
    out = tmp_path / "bench_graph"
    assert main(["benchmark", str(run), "--device", "cpu", "--cuda-graph", "--no-onnx", "--runs", "1",
                 "--out", str(out)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not out.exists()
    res = benchmark_models({"baseline": torch.nn.Conv2d(3, 8, 1), "pruned": torch.nn.Conv2d(3, 4, 1)}, (8, 8),
                           batches=[1], runs=1, warmup=0, threads=1, onnx=False)
    assert "CUDA graph" not in render_benchmark(res)
    for name, ms in (("baseline", 4.0), ("pruned", 1.0)):
        res["models"][name]["latency"]["1"]["graph"] = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms}
    res["ratios"]["1"]["graph"] = 0.25
    md = render_benchmark(res)
    assert "CUDA graph ms" in md and "0.250x" in md and "4.00" in md
