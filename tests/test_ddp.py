"""Data-parallel training under torchrun (segprune.engine.distributed), proven on CPU with gloo.

The pipeline is run twice on the same config through the CLI: once in one process, once with
``python -m torch.distributed.run --nproc_per_node=2`` (2 processes, global batch unchanged), and
the run folders are compared.

Both runs are made in **float64** (``tests/_float64_cli.py``). The two runs add the same numbers in
a different order (per-rank partial sums + all-reduce; BatchNorm statistics of the global batch from
float64 sums instead of the native kernel), so they can only agree to rounding. In float32 that
rounding depends on the CPU's instruction set (oneDNN and ATen pick other kernels, hence other
summation orders, on SSE4.1, AVX, AVX2, AVX-512) and training amplifies it (measured, 1 vs 2
processes at SSE4.1: 7e-6 relative in the weights after segmentation training, 2e-3 after MTP's
sparsity training, 1e-1 after fine-tuning), while the γ gaps at the pruning threshold of this short
schedule are only 6e-7 to 1e-5 (γ ≈ 1 after 4 sparsity steps): which channel is pruned was decided
by rounding, and the tests passed only on AVX2 (issue 13). In float64 the measured differences are
≤ 3e-13 relative, 6 orders of magnitude below those gaps, on every instruction set; the tolerances
below (``F64_REL``) are stated against that spread. The one-step test of SyncBN, dropout and the
gradient sum stays in float32 (one step: no amplification). See docs/distributed.md.
"""
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import TensorDataset

from conftest import TINY
from segprune.checkpoint import load_state_dict
from segprune.engine import distributed as ddp
from segprune.engine.resume import LoaderCursor
from segprune.engine.train import make_loader

#: TINY with larger images and batches (well-conditioned BatchNorm statistics: the ASPP pooling
#: branch normalises over batch_size values) and a short, gentle schedule.
DDP = copy.deepcopy(TINY)
DDP["data"]["seg"].update(input_size=[64, 64], crop_size=[64, 64], image_size=[64, 64], batch_size=8, num_train=32)
DDP["data"]["cls"].update(input_size=[32, 32], image_size=[32, 32], batch_size=16, num_train=64)
DDP["train"] = {"pretrain_cls": {"epochs": 1, "lr": 0.01}, "seg": {"epochs": 2, "lr": 0.01}}
DDP["finetune"] = {"cls": {"epochs": 1, "lr": 0.005}, "seg": {"epochs": 1, "lr": 0.005}}
DDP["distributed"] = {"backend": "gloo", "device": "cpu"}

TRAIN_STAGES = ("01_pretrain_cls", "02_train_seg", "03_sparsity", "05_finetune_cls", "06_finetune_seg")

#: Relative tolerance of the float64 run comparisons (training losses, MTP's ||W1 - W3||, weights
#: per tensor against the tensor's largest entry). Measured, 1 vs 2 processes and SSE4.1 vs AVX2
#: kernels: at most 2.4e-13 (weights; 1.9e-13 since DistributedDataParallel is the engine), 1.4e-15
#: (losses), 6e-16 (||W1 - W3||). 1e-9 leaves a margin
#: of 4000 over that, and lies 3 to 8 orders of magnitude below the float32 spread of the same
#: comparison (3e-8 to 1e-1), so a run that silently computed in float32 fails it.
F64_REL = 1e-9

#: Another summation order for the guard test: oneDNN capped at SSE4.1 and ATen's vectorised
#: kernels at their portable build (read when torch loads, hence only in a subprocess). On this
#: project's AVX2 machine both change float64 results (measured: 1e-14 in the weights).
OTHER_KERNELS = {"ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"}

_F64_CLI = str(Path(__file__).with_name("_float64_cli.py"))


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SEGPRUNE_KILL_AT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg_path: Path, out: Path, nproc: int, extra=(), kill_at: str | None = None,
         env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``segprune run`` in float64 (tests/_float64_cli.py), in 1 process or under torchrun."""
    env = {**_env(), **(env_extra or {})}
    if kill_at:  # engine.resume.fault_point: every rank SIGKILLs itself after that iteration
        env["SEGPRUNE_KILL_AT"] = kill_at
    cli = [_F64_CLI, "run", str(cfg_path), "--out", str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *cli]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = tmp / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(DDP))
    one, two = tmp / "one", tmp / "two"
    r1 = _run(cfg, one, 1, ["--quiet"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run(cfg, two, 2)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    return one, two, r2.stdout


def _json(p: Path):
    return json.loads(p.read_text())


@contextlib.contextmanager
def _float64_default():
    """torch's default dtype float64 in this process (as tests/_float64_cli.py sets it in the runs)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _assert_same_pipeline(a: Path, b: Path) -> None:
    """Run folders ``a`` and ``b`` hold the same pipeline result: equal pruned widths, parameter
    counts, FLOPs and evaluation metrics; training losses, MTP's ||W1 - W3|| and every stage's
    float64 weights within ``F64_REL``."""
    assert _json(b / "stages/04_prune/arch.json")["widths"] == _json(a / "stages/04_prune/arch.json")["widths"]
    m1, m2 = _json(a / "metrics.json"), _json(b / "metrics.json")
    assert m1["kept_per_part"] == m2["kept_per_part"]
    for key in ("baseline", "pruned"):
        for k in ("params", "flops", "macs"):
            assert m1[key][k] == m2[key][k], (key, k)
        # Equal, no tolerance: a pixel's (an image's) predicted class can only change if two class
        # scores lie within the float64 spread (~1e-13 relative) of each other.
        for k in ("miou", "pixel_acc", "per_class_iou", "cls_top1"):
            assert m1[key][k] == m2[key][k], (key, k, m1[key][k], m2[key][k])
    for st in TRAIN_STAGES:  # training losses (global means over the same batches)
        d1, d2 = _json(a / "stages" / st / "done.json"), _json(b / "stages" / st / "done.json")
        assert d1["fingerprint"] == d2["fingerprint"] and d1.get("iters") == d2.get("iters")
        if "loss" in d1:
            assert d2["loss"] == pytest.approx(d1["loss"], rel=F64_REL, abs=0), st
    s1, s2 = _json(a / "stages/03_sparsity/done.json"), _json(b / "stages/03_sparsity/done.json")
    assert s1["mu"] == s2["mu"] and s1["steps"] == s2["steps"]  # μ: Eq. 10's schedule, the same steps
    assert s2["gap"] == pytest.approx(s1["gap"], rel=F64_REL, abs=0)  # ||W1 - W3||, from which E accumulates
    for st in TRAIN_STAGES + ("04_prune",):
        w1, w2 = (load_state_dict(d / "stages" / st / "model.safetensors") for d in (a, b))
        assert w1.keys() == w2.keys()
        for k in w1:
            if w1[k].is_floating_point():
                assert w1[k].dtype == w2[k].dtype == torch.float64, (st, k)  # the runs really were float64
                assert (w1[k] - w2[k]).abs().max() <= F64_REL * w1[k].abs().max(), (st, k)
            else:
                assert torch.equal(w1[k], w2[k]), (st, k)


# ---- the sampler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,batch,world", [(37, 8, 2), (40, 12, 3), (16, 4, 4)])
def test_rank_slices_concatenate_to_the_one_process_batches(n, batch, world):
    """Several epochs, then a restart from a saved generator state mid-epoch (LoaderCursor, as the
    in-stage resume does): rank r's batch is always the r-th contiguous slice of the 1-process batch."""
    ds = TensorDataset(torch.arange(n))
    one = LoaderCursor(make_loader(ds, batch, True, 11))
    ranks = [LoaderCursor(ddp.train_loader(ds, batch, 11, 0, r, world)) for r in range(world)]
    assert all(len(c.loader) == len(one.loader) == n // batch for c in ranks)
    saved = {}
    for epoch in range(4):
        ref = [b[0].tolist() for b in one.batches(epoch)]
        saved[epoch] = one.epoch_state.clone()
        got = [[b[0].tolist() for b in c.batches(epoch)] for c in ranks]
        assert all(len(g) == len(ref) for g in got)
        for i, full in enumerate(ref):
            parts = [g[i] for g in got]
            assert [len(p) for p in parts] == [batch // world] * world
            assert sum(parts, []) == full
        assert all(torch.equal(c.epoch_state, one.epoch_state) for c in ranks)  # the generator advanced alike
    # resume epoch 2 after one batch, at another world size than the one that "saved" it
    fresh = LoaderCursor(make_loader(ds, batch, True, 11))
    fresh.restore(saved[2])
    ref = [b[0].tolist() for b in fresh.batches(2, skip=1)]
    for w in (1, 2):
        cs = [LoaderCursor(ddp.train_loader(ds, batch, 11, 0, r, w)) for r in range(w)]
        for c in cs:
            c.restore(saved[2])
        got = [[b[0].tolist() for b in c.batches(2, skip=1)] for c in cs]
        assert [sum(parts, []) for parts in zip(*got)] == ref


def test_single_process_loader_is_unchanged():
    """``shard=True`` without a process group is the plain DataLoader of before."""
    ds = TensorDataset(torch.arange(10))
    a, b = make_loader(ds, 4, True, 3), make_loader(ds, 4, True, 3, shard=True)
    assert type(a.sampler) is type(b.sampler) and [x[0].tolist() for x in a] == [x[0].tolist() for x in b]


# ---- SyncBN, rank-sliced dropout, gradient sum: one step against the global batch -----------------
def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout2d(0.3), nn.Conv2d(8, 4, 1))


def _toy_data():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 6, 6, generator=g) * 2 + 1
    y = torch.randint(0, 4, (4, 6, 6), generator=g)
    y[1, :3] = 255  # the two halves hold different numbers of ignored pixels
    y[3, :, :1] = 255
    return x, y


def _toy_worker(rank, world, port, q):
    import torch.nn.functional as F
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ddp.init("gloo", 60, True, False)
    m, (x, y) = _toy(), _toy_data()
    unused = nn.Linear(3, 2)  # trained alongside, never reached by the loss (as a segmentation net's fc head)
    n = x.shape[0] // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    torch.manual_seed(1)
    with ddp.replicated(m), ddp.data_parallel(m, unused) as run:
        classes = [type(mod).__name__ for mod in m]
        denom = ddp.global_count((y != 255).sum())
        loss = run(lambda: ddp.share(F.cross_entropy(m(x), y, ignore_index=255, reduction="sum"), denom))
        loss.backward()
        total = ddp.sum_values(loss.detach())[0]
        engine = type(run).__name__
    res = {"loss": total, "grads": [p.grad.numpy().copy() for p in m.parameters()],
           "running": [t.numpy().copy() for k, t in m.state_dict().items() if "running" in k],
           "inside": classes, "after": [type(mod).__name__ for mod in m], "rng": torch.get_rng_state().numpy().copy(),
           "engine": engine, "unused_grad": [p.grad for p in unused.parameters()]}
    q.put((rank, res))
    ddp.teardown()


def test_sync_batchnorm_dropout_and_gradient_sum_match_the_global_batch():
    """torch.nn.SyncBatchNorm refuses CPU tensors (torch 2.13, 2.14); segprune's replacement, the
    rank-sliced dropout masks and the loss share + torch's DistributedDataParallel (gloo, gradients
    summed by segprune's communication hook) give the 1-process step of the global batch; a
    parameter no rank's loss reaches keeps ``grad = None`` (SGD skips it, as in one process)."""
    import numpy as np
    import torch.multiprocessing as mp
    import torch.nn.functional as F

    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        _sync_bn_refuses_cpu()
    m, (x, y) = _toy(), _toy_data()
    torch.manual_seed(1)
    loss = F.cross_entropy(m(x), y, ignore_index=255)
    loss.backward()
    ref = {"loss": loss.item(), "grads": [p.grad.numpy() for p in m.parameters()],
           "running": [t.numpy() for k, t in m.state_dict().items() if "running" in k], "rng": torch.get_rng_state().numpy()}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_toy_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for r in (0, 1):
        g = got[r]
        assert "ReplicatedBatchNorm2d" in g["inside"] and "ReplicatedDropout" in g["inside"]
        assert g["engine"] == "DistributedDataParallel"
        assert g["unused_grad"] == [None, None]
        assert g["after"] == [type(mod).__name__ for mod in m]  # plain classes again after the loop
        assert abs(g["loss"] - ref["loss"]) < 1e-6
        for a, b in zip(g["grads"], ref["grads"]):
            assert np.abs(a - b).max() <= 1e-6 * max(1.0, float(np.abs(b).max()))
        for a, b in zip(g["running"], ref["running"]):
            assert np.abs(a - b).max() <= 1e-6
        assert (g["rng"] == ref["rng"]).all()  # dropout consumed the global generator as the 1-process run
        assert all((a == b).all() for a, b in zip(g["grads"], got[0]["grads"]))  # ranks bitwise identical


def _sync_bn_refuses_cpu():
    """torch's own SyncBatchNorm in train mode on CPU under an initialised (1-rank gloo) group."""
    import torch.distributed as dist
    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        nn.SyncBatchNorm(4).train()(torch.randn(2, 4, 3, 3))
    finally:
        dist.destroy_process_group()


def test_on_cuda_batchnorms_become_torch_syncbatchnorm(monkeypatch):
    """The CUDA path of ``replicated`` (selected here by hand: no GPU): every BatchNorm *is* a
    ``torch.nn.SyncBatchNorm`` inside the loop, in the state ``convert_sync_batchnorm`` would build
    (same attributes, ``process_group`` None), and torch's implementation runs (on the CPU it raises
    its own error); unlike ``convert_sync_batchnorm``, the module objects, their tensors and their
    forward hooks (ACoSP's masks, CAP's and SIRFP's statistics) are kept, and the plain classes come
    back on exit."""
    import torch.distributed as dist
    monkeypatch.setattr(ddp, "_torch_sync_bn", lambda: True)  # what a rank on a CUDA device selects
    monkeypatch.setitem(ddp._STATE, "world", 2)
    m, (x, _) = _toy(), _toy_data()
    bn = m[1]
    calls = []
    bn.register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    ref = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m))[1]
    assert len(ref._forward_hooks) == 0  # convert_sync_batchnorm builds a new module: the hook is lost
    tensors = {k: t.data_ptr() for k, t in m.state_dict().items()}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with ddp.replicated(m):
            assert type(m[1]) is nn.SyncBatchNorm and type(m[5]) is nn.SyncBatchNorm and m[1] is bn
            assert sorted(vars(bn)) == sorted(vars(ref)) and bn.process_group is None
            with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
                m(x)  # torch's SyncBatchNorm, in train mode under a process group
            m.eval()
            m(x)
        assert calls == [nn.SyncBatchNorm]  # the hook ran on the converted layer (eval: no sync)
    finally:
        dist.destroy_process_group()
    assert type(bn) is nn.BatchNorm2d and "process_group" not in vars(bn)
    assert {k: t.data_ptr() for k, t in m.state_dict().items()} == tensors  # the same storage


# ---- the pipeline: 1 process vs 2 processes --------------------------------------------------------
def test_two_processes_give_the_one_process_widths_and_metrics(runs):
    one, two, _ = runs
    _assert_same_pipeline(one, two)


def test_one_process_on_other_kernels_gives_the_two_process_result(runs, tmp_path):
    """Guard for issue 13: the equivalence must not hold for one summation order only. A 1-process
    run with oneDNN capped at SSE4.1 and ATen's portable kernels (``OTHER_KERNELS``: other
    summation orders on any x86 CPU) gives the 2-process run of the default kernels, with the
    assertions of the test above. (It also compares two instruction sets in one process.)"""
    one, two, _ = runs
    out = tmp_path / "other_kernels"
    r = _run(one.parent / "ddp.yaml", out, 1, ["--quiet"], env_extra=OTHER_KERNELS)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_pipeline(two, out)
    _assert_same_pipeline(one, out)


def test_mtp_multipliers_identical_on_both_ranks(runs):
    one, two, _ = runs
    d2, d1 = _json(two / "stages/03_sparsity/done.json"), _json(one / "stages/03_sparsity/done.json")
    digests = d2["rank_digests"]
    assert [d["rank"] for d in digests] == [0, 1]
    for key in ("E", "mu", "W1", "model"):  # bitwise: every rank took the same steps
        assert digests[0][key] == digests[1][key], key
    assert d2["mu"] == d1["mu"] and d2["steps"] == d1["steps"]
    assert d2["gap"] == pytest.approx(d1["gap"], rel=F64_REL, abs=0)  # ||W1 - W3|| of the 1-process run
    assert "rank_digests" not in d1 and "world_size" not in d1  # a single process records nothing new
    assert "E and mu identical on the 2 ranks" in (two / "logs/sparsity.log").read_text()


def test_only_rank_zero_writes(runs):
    one, two, stdout = runs
    rel = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert rel(two) == rel(one)  # same files, no partial/temporary/duplicate ones
    assert not [p for p in two.rglob("*") if p.name.endswith(".tmp") or p.name == "partial.safetensors"]
    for log in (one / "logs").iterdir():  # one set of log lines (rank 1 logs nothing)
        n1 = len(log.read_text().splitlines())
        n2 = len((two / "logs" / log.name).read_text().splitlines())
        assert n2 == n1 + (1 if log.name == "sparsity.log" else 0), log.name
    assert stdout.count("run folder:") == 1  # one summary printed
    for st in TRAIN_STAGES + ("04_prune",):
        d = _json(two / "stages" / st / "done.json")
        assert d["world_size"] == 2 and d["replicas_identical"] is True, st


def test_two_process_checkpoints_load_in_one_process(runs, capsys):
    """No ``module.`` prefix; ``segprune evaluate`` (1 process, full eval set) reproduces the mIoU the
    2-process run measured with sharded evaluation."""
    from segprune.cli import main
    one, two, _ = runs
    for st in TRAIN_STAGES + ("04_prune",):
        keys = load_state_dict(two / "stages" / st / "model.safetensors").keys()
        assert keys == load_state_dict(one / "stages" / st / "model.safetensors").keys()
        assert not any(k.startswith("module.") for k in keys)
    with _float64_default():  # the run's precision (a float32 model would round the float64 weights)
        assert main(["evaluate", str(two)]) == 0
    assert "reproduced exactly" in capsys.readouterr().out


def test_batch_not_divisible_by_the_processes_is_refused(tmp_path, monkeypatch):
    from segprune.config import ConfigError, load_config
    from segprune.pipeline import Pipeline
    cfg = copy.deepcopy(DDP)
    cfg["data"]["seg"]["batch_size"] = 7
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    monkeypatch.setitem(ddp._STATE, "world", 2)  # as under torchrun with 2 processes (checked before any collective)
    with pytest.raises(ConfigError, match=r"data\.seg\.batch_size=7: the global batch must be divisible by the 2 processes"):
        Pipeline(load_config(p), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_in_stage_checkpoint_of_two_processes_resumes_in_one_process(runs, tmp_path):
    """Both ranks killed mid-epoch (SIGKILL after iteration 3 of train_seg, checkpoints every 2): the
    partial checkpoint rank 0 wrote at iteration 2 (global data position, SGD momentum, RNG) resumes
    in a single process and ends where the uninterrupted 1-process run ends (``F64_REL``, as above).

    Mid-epoch on purpose: a checkpoint taken at the *last* batch of an epoch does not resume to the
    uninterrupted result even in a single process (engine.train.train_loop skips the finished epoch
    without advancing the loader generator through it); that is a bug of the 1-process resume, not
    of the distributed path."""
    one, _, _ = runs
    cfg = copy.deepcopy(DDP)
    cfg["checkpoint_every"] = 2
    path = tmp_path / "ck.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "killed"
    r = _run(path, out, 2, ["--quiet"], kill_at="train_seg:3")
    assert r.returncode != 0
    assert (out / "stages/02_train_seg/partial.safetensors").is_file()
    assert not (out / "stages/02_train_seg/done.json").exists()
    r = _run(path, out, 1, ["--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at iteration 2 (epoch 1, batch 2)" in (out / "logs/train_seg.log").read_text()  # rank 0's checkpoint
    _assert_same_pipeline(one, out)
