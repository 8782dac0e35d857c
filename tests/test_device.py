"""Device hygiene, checked on the CPU: every tensor a method creates lands on the device of what it meets.

The trick (issue 16): the model and every batch sit explicitly on the CPU while ``torch.device("meta")``
is the *default* device. A tensor created without ``device=`` (``torch.zeros(c)``, ``torch.randn(c)``,
``torch.tensor(order)``, ``torch.as_tensor(t)``, ...) then lands on ``meta``, and the first operation
that mixes it with a CPU tensor raises -- exactly where, on a GPU, a CPU tensor would meet a CUDA one.
The results must also be bitwise those of a run without the meta default device (nothing was silently
created elsewhere). Restoring saved state (in-stage checkpoints and the sparsity stage's method state,
which ``segprune.checkpoint`` loads onto the CPU) is checked with a model moved to ``meta``: the
restored tensors must follow the model.

What a GPU adds (kernels, streams, the CUDA RNG) is not covered here; ``benchmarks/gpu_check.py`` is
the script for a GPU machine.
"""
import copy
import inspect
import math

import pytest
import torch

from segprune.config import DEFAULTS, ConfigError, load_config, validate
from segprune.engine.device import describe_device, device_problem, resolve_device
from segprune.engine.evaluate import evaluate_classification, evaluate_segmentation
from segprune.engine.log import StageLog
from segprune.engine.metrics import SegmentationMetric, confusion_matrix
from segprune.engine.resume import StageCheckpoint, restore_rng, rng_state
from segprune.methods import build_method
from segprune.methods.acosp import UnitMasks
from segprune.methods.cap import ContextGuide
from segprune.methods.mtp import run_mtp
from segprune.methods.sirfp import RedundancyTracker
from segprune.models import build_model
from segprune.pruning import build_graph, discover_units, round_kept, select_channels
from segprune.pruning.groups import unit_gammas

META = torch.device("meta")
K, K_CLS, SIZE = 3, 4, 32


class ListLoader:
    """Fixed CPU batches. Iterating it creates no tensor (a DataLoader's sampler would draw its
    permutation on the default device, i.e. on ``meta``, which is not what is tested here)."""

    def __init__(self, batches):
        self.batches, self.generator, self.dataset = batches, None, None

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _batches(n, shape, classes, label_shape, seed):
    g = torch.Generator().manual_seed(seed)
    return ListLoader([(torch.randn(*shape, generator=g), torch.randint(0, classes, label_shape, generator=g))
                       for _ in range(n)])


def _seg(n=2, seed=0):
    return _batches(n, (2, 3, SIZE, SIZE), K, (2, SIZE, SIZE), seed)


def _cls(n=2, seed=1):
    return _batches(n, (4, 3, 16, 16), K_CLS, (4,), seed)


def _setup():
    torch.manual_seed(0)
    model = build_model({"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 8}, K, K_CLS)
    return model, discover_units(model, build_graph(model, (SIZE, SIZE)))


BASE = {"epochs": 1, "lr_seg": 0.01, "lr_cls": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "max_iters_per_epoch": 2,
        "calib_batches": 1, "samples_per_batch": 8}
METHODS = {
    "uniform": {"name": "uniform"},
    "fpgm": {"name": "fpgm"},
    "slimming": {"name": "slimming", "alpha": 0.01, "l1_mode": "subgradient"},
    "slimming_prox": {"name": "slimming", "alpha": 0.01, "l1_mode": "proximal"},
    "thinet": {"name": "thinet", "graph_input_size": [SIZE, SIZE]},
    "cap": {"name": "cap", "alpha": 0.01, "l1_mode": "subgradient", "options": {"ema": 0.5}},
    "cap_prox": {"name": "cap", "alpha": 0.01, "l1_mode": "proximal", "options": {"guide": "decoder"}},
    "sirfp": {"name": "sirfp", "options": {"ema": 0.5, "edge_weight": 0.5}},
    "sirfp_calib": {"name": "sirfp", "epochs": 0, "options": {"edge_weight": 0.5}},  # R from calibration batches
    "acosp": {"name": "acosp", "options": {"keep_ratio": 0.5, "min_keep": 1, "end_epoch_frac": 0.5}},
}
MTP = {**BASE, "name": "mtp", "lam": 1.0, "alpha1": 1e-3, "alpha2": 1e-3, "mu0": 0.1, "rho": 1.1, "mu_max": 10.0,
       "update_every": 1, "l1_mode": "proximal", "keep_copy": "w3"}


def _run_method(key, tmp, default_device=None):
    """Train (a few steps, with in-stage checkpoints, then again to resume from them), score and
    select with ``default_device`` as torch's default device. Returns (model, scores, kept)."""
    model, units = _setup()
    meth = build_method({**BASE, **METHODS[key]})
    seg, cls, calib = _seg(), _cls(), _seg(1, seed=5)
    kw = {"ckpt": StageCheckpoint(tmp / "partial.safetensors", every=1)} if "ckpt" in inspect.signature(meth.train).parameters else {}
    with torch.device(default_device) if default_device is not None else _nothing():
        meth.train(model, units, seg, cls, 255, StageLog("sparsity", quiet=True), **kw)
        if kw and kw["ckpt"].path.is_file():  # the resume path: restores weights, optimizer, method state and RNG
            meth.train(model, units, seg, cls, 255, StageLog("sparsity", quiet=True), **kw)
        scores = meth.scores(model, units, calib)
        kept = meth.select(model, units, 0.5, "ind", 1, calib)
        rounded = round_kept(kept, scores, 4)
    return model, scores, kept, rounded


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].device.type == "cpu", (what, k, a[k].device)
        assert torch.equal(a[k], b[k]), (what, k)


@pytest.mark.parametrize("key", sorted(METHODS))
def test_method_creates_no_tensor_off_the_model_device(key, tmp_path):
    """Training steps (with checkpoint and resume), scores and selection of every method, with
    ``meta`` as the default device, give bitwise the results of a plain run."""
    m0, s0, k0, r0 = _run_method(key, tmp_path / "plain")
    m1, s1, k1, r1 = _run_method(key, tmp_path / "meta", default_device=META)
    assert all(p.device.type == "cpu" for p in m1.parameters())
    _assert_same(s1, s0, "scores")
    _assert_same(k1, k0, "kept")
    _assert_same(r1, r0, "rounded")
    _assert_same(m1.state_dict(), m0.state_dict(), "model")


def test_mtp_creates_no_tensor_off_the_model_device():
    def run(default_device):
        model, units = _setup()
        cls, seg = _cls(), _seg()
        with torch.device(default_device) if default_device is not None else _nothing():
            mtp = run_mtp(model, units, cls, seg, MTP, 255, StageLog("sparsity", quiet=True))
            scores = unit_gammas(model, units, mtp.score_sources())
            kept = select_channels(scores, {u.name: u.part for u in units}, 0.5, "ind", 1)
            gap = mtp.gap()
        return model, scores, kept, gap

    m0, s0, k0, g0 = run(None)
    m1, s1, k1, g1 = run(META)
    _assert_same(s1, s0, "scores")
    _assert_same(k1, k0, "kept")
    _assert_same(m1.state_dict(), m0.state_dict(), "model")
    assert g1 == g0


@pytest.mark.parametrize("protocol", [None, {"scales": [0.75, 1.0], "flip": True},
                                      {"mode": "slide", "crop_size": [24, 24], "stride": [16, 16]}])
def test_evaluation_creates_no_tensor_off_the_model_device(protocol):
    model, _ = _setup()
    seg, cls = _seg(), _cls()
    ref = evaluate_segmentation(model, seg, K, 255, protocol=protocol)
    top1 = evaluate_classification(model.forward_cls, cls)
    with torch.device(META):
        got = evaluate_segmentation(model, seg, K, 255, protocol=protocol)
        assert evaluate_classification(model.forward_cls, cls) == top1
    assert got == ref and sum(map(sum, got["confusion"])) == 2 * 2 * SIZE * SIZE


@pytest.mark.parametrize("eager", [None, False])  # None: checked per batch on the CPU; False: the GPU path
def test_confusion_matrix_is_accumulated_on_the_logits_device(eager):
    """The matrix is accumulated where the logits are (nothing created elsewhere, no per-batch copy to the
    host) and read once; the deferred-check path (the default off the CPU) gives the same integers."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, K, 8, 8, generator=g)
    target = torch.randint(0, K, (2, 8, 8), generator=g)
    target[0, 0] = 255
    with torch.device(META):
        m = SegmentationMetric(K, 255, eager_checks=eager)
        m.update(logits, target)
        m.update(logits.argmax(1), target)
        assert m.confusion.device.type == "cpu"
        out = m.compute()
    cm = confusion_matrix(logits.argmax(1), target, K, 255)
    assert out["confusion"] == (2 * cm).tolist() and cm.dtype == torch.int64 and cm.device.type == "cpu"
    ref = SegmentationMetric(K, 255)
    ref.update(torch.cat([logits, logits]), torch.cat([target, target]))
    assert out == ref.compute()


@pytest.mark.parametrize("eager", [None, False])
def test_out_of_range_labels_are_still_reported(eager):
    m = SegmentationMetric(K, 255, eager_checks=eager)
    bad = torch.tensor([[[0, 7], [1, 255]]])
    match = r"target values outside \[0, 3\).*\[7\]" if eager is None else r"target values outside \[0, 3\).*1 pixel"
    with pytest.raises(ValueError, match=match):
        m.update(torch.zeros(1, K, 2, 2), bad)
        m.compute()  # deferred: raised when the matrix is read
    m = SegmentationMetric(K, 255, eager_checks=eager)
    with pytest.raises(ValueError, match="prediction values outside"):
        m.update(torch.tensor([[[0, 5], [1, 2]]]), torch.tensor([[[0, 1], [1, 255]]]))
        m.compute()


# ---- restored state follows the model (checkpoint.py loads onto the CPU) ------------------------------
def _on_meta():
    model, units = _setup()
    return model.to(META), units


def test_cap_resume_state_moves_to_the_model_device():
    model, units = _on_meta()
    bns = [b for u in units for b in u.bns][:2]
    guide = ContextGuide(model, bns)
    guide.load_state_tensors({b: torch.ones(dict(model.named_modules())[b].num_features) for b in bns}, "test")
    assert {t.device for t in guide.running.values()} == {META}
    guide.remove()


def test_sirfp_resume_and_trained_state_move_to_the_model_device():
    model, units = _on_meta()
    tr = RedundancyTracker(model, units, ema=0.5, edge_parts=("backbone",))
    saved = {}
    for kind, emas in (("red", tr.red), ("edge", tr.edge)):
        for b in emas:
            c = dict(model.named_modules())[b].num_features
            saved[f"{kind}.{b}.t"] = torch.tensor(3)
            saved[f"{kind}.{b}.s"] = torch.ones(c, c) if kind == "red" else torch.ones(c)
    tr.load_state_tensors(saved, "test")
    assert {e._s.device for e in list(tr.red.values()) + list(tr.edge.values())} == {META}
    assert tr.state_tensors()[f"red.{units[0].bns[0]}.t"].device.type == "cpu"  # a counter: CPU, whatever the default
    meth = build_method({**BASE, **METHODS["sirfp"]})
    meth.load_trained_state(model, units, {f"{u.name}.R": torch.eye(u.channels) for u in units}, "test")
    assert {r.device for r, _ in meth._stats[1].values()} == {META}


def test_acosp_logits_are_created_and_restored_on_the_model_device():
    model, units = _on_meta()
    masks = UnitMasks(model, units, {u.name: 1 for u in units})
    assert {w.device for w in masks.logits} == {META}
    masks.remove()
    meth = build_method({**BASE, **METHODS["acosp"]})
    meth.load_trained_state(model, units, {u.name: torch.randn(u.channels) for u in units}, "test")
    assert {w.device for w in meth.logits.values()} == {META}


def test_acosp_initial_logits_are_drawn_from_the_cpu_generator():
    """The logits are drawn on the CPU and moved to the model: the same start on every device."""
    model, units = _setup()
    torch.manual_seed(3)
    expected = [torch.randn(u.channels) for u in units]
    torch.manual_seed(3)
    with torch.device(META):
        masks = UnitMasks(model, units, {u.name: 1 for u in units})
    assert all(w.device.type == "cpu" and torch.equal(w.detach(), e) for w, e in zip(masks.logits, expected))
    masks.remove()


# ---- RNG in checkpoints ------------------------------------------------------------------------------
def test_rng_state_on_the_cpu_is_the_cpu_rng_only_and_old_checkpoints_restore():
    torch.manual_seed(7)
    st = rng_state(torch.device("cpu"))
    assert set(st) == {"rng.torch"} and st["rng.torch"].device.type == "cpu"
    a = torch.rand(3)
    restore_rng({"rng.torch": st["rng.torch"]}, torch.device("cpu"))  # an old checkpoint: CPU RNG only
    assert torch.equal(torch.rand(3), a)
    # a checkpoint written on a GPU, resumed on the CPU: the CUDA state is ignored, the CPU one restored
    restore_rng({"rng.torch": st["rng.torch"], "rng.cuda": torch.zeros(16, dtype=torch.uint8)}, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a)


def test_rng_state_on_cuda_records_the_device_generator(monkeypatch):
    """The CUDA branch with torch.cuda's RNG calls replaced (no GPU here): it reads and writes the
    generator of the model's device."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.ones(4, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, state.sum().item())))
    dev = torch.device("cuda", 1)
    st = rng_state(dev)
    assert set(st) == {"rng.torch", "rng.cuda"} and st["rng.cuda"].device.type == "cpu"
    restore_rng(st, dev)
    assert calls == [("get", dev), ("set", dev, 4)]
    calls.clear()
    restore_rng({"rng.torch": st["rng.torch"]}, dev)  # written on the CPU: nothing to restore on the GPU
    assert calls == []


# ---- the device key ----------------------------------------------------------------------------------
def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_resolve_device(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"device='{spec}' requested but CUDA is not available on this machine"):
            resolve_device(spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"device='cuda:2'.*2 CUDA devices"):
        resolve_device("cuda:2")
    for bad in ("gpu", "cuda:x", "cuda:-1", "CUDA", "mps", 0, ""):
        with pytest.raises(ConfigError, match="device="):
            resolve_device(bad)


def test_device_key_is_validated_and_leaves_the_fingerprints_alone():
    from segprune.pipeline import stage_fingerprints
    assert DEFAULTS["device"] == "auto"
    for ok in ("auto", "cpu", "cuda", "cuda:0", "cuda:3"):
        assert device_problem(ok) is None
        cfg = copy.deepcopy(DEFAULTS)
        cfg["device"] = ok
        assert not [p for p in validate(cfg, raise_error=False) if p.startswith("device")]
    for bad in ("gpu", "cuda:", "cuda:a", None, 1, "cpu:0"):
        cfg = copy.deepcopy(DEFAULTS)
        cfg["device"] = bad
        assert [p for p in validate(cfg, raise_error=False) if p.startswith("device=")], bad
    with pytest.raises(ConfigError, match="device="):
        load_config(None, ["device=gpu"])
    fps = {spec: stage_fingerprints(load_config(None, [f"device={spec}"])) for spec in ("auto", "cpu", "cuda", "cuda:1")}
    assert all(fp == fps["auto"] for fp in fps.values())
    no_key = copy.deepcopy(DEFAULTS)
    del no_key["device"]  # a run made before the key existed
    assert stage_fingerprints(no_key) == fps["auto"]


def test_describe_device():
    d = describe_device(torch.device("cpu"))
    assert d["type"] == "cpu" and d["dtype"] == "float32" and d["name"]


@pytest.mark.parametrize("cmd", [["evaluate", "RUN"], ["benchmark", "RUN"], ["export", "RUN", "--onnx", "OUT.onnx"]])
def test_cli_refuses_cuda_without_cuda_before_writing(cmd, tmp_path, monkeypatch, capsys):
    from segprune.cli import main
    _no_cuda(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    argv = [str(run) if a == "RUN" else str(tmp_path / a) if a == "OUT.onnx" else a for a in cmd]
    assert main(argv + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device='cuda' requested but CUDA is not available on this machine" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["run"]  # nothing written


def test_evaluate_tolerance_verdict():
    from segprune.cli import MIOU_TOLERANCE, reproduction_verdict
    cpu = {"type": "cpu", "name": "x", "dtype": "float32"}
    gpu = {"type": "cuda", "name": "NVIDIA H200", "dtype": "float32"}
    ok, text = reproduction_verdict(0.5, 0.5, cpu, cpu)
    assert ok and "exactly" in text
    ok, text = reproduction_verdict(0.5 + 1e-9, 0.5, cpu, cpu)   # same device: exact, no tolerance
    assert not ok and "DIFFERS" in text
    ok, text = reproduction_verdict(0.5 + 0.5 * MIOU_TOLERANCE, 0.5, gpu, cpu)
    assert ok and "within" in text and "cuda" in text and "cpu" in text
    ok, text = reproduction_verdict(0.5 + 2 * MIOU_TOLERANCE, 0.5, gpu, cpu)
    assert not ok and "DIFFERS" in text
    ok, _ = reproduction_verdict(0.5 + 0.5 * MIOU_TOLERANCE, 0.5, gpu, {**gpu, "name": "NVIDIA A100"})
    assert ok  # another GPU model: other kernels, the tolerance applies
    ok, _ = reproduction_verdict(0.5 + 0.5 * MIOU_TOLERANCE, 0.5, gpu, gpu)
    assert not ok  # the same GPU model and dtype: exact
    assert math.isclose(MIOU_TOLERANCE, 1e-3)
