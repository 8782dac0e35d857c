import pytest
import torch
import torch.nn as nn

from segprune.engine.profile import count_flops, count_params, measure_latency, profile_model


def test_conv_flops_exact():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    r = count_flops(conv, (16, 16))
    assert r["flops"] == 2 * 8 * 3 * 3 * 3 * 16 * 16
    assert r["macs"] == 8 * 3 * 3 * 3 * 16 * 16
    assert r["input_size"] == [16, 16]
    assert "multiply-add" in r["note"]


def test_non_square_and_in_channels():
    conv = nn.Conv2d(1, 4, 1, bias=False)
    r = count_flops(conv, (5, 7), in_channels=1)
    assert r["flops"] == 2 * 4 * 1 * 5 * 7


class _FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_linear_flops():
    r = count_flops(_FlattenLinear(), (4, 4))
    assert r["flops"] == 2 * 48 * 10
    assert r["macs"] == 48 * 10


def test_forward_fn_is_used():
    lin = nn.Linear(6, 5)
    r = count_flops(lin, (2, 1), forward_fn=lambda m, x: m(x.reshape(1, 6)))
    assert r["flops"] == 2 * 6 * 5


def test_flops_restores_per_module_training_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.train()
    model[1].eval()  # e.g. frozen BN
    count_flops(model, (8, 8))
    assert model.training and model[0].training and not model[1].training
    # eval-mode forward did not update BN running stats
    assert int(model[1].num_batches_tracked) == 0


def test_count_params_and_shared():
    conv = nn.Conv2d(3, 8, 3, bias=True)
    bn = nn.BatchNorm2d(8)
    assert count_params(conv) == 8 * 3 * 9 + 8
    assert count_params(bn) == 16  # running stats are buffers, not params
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 16 + 4
    frozen = nn.Linear(2, 3)
    frozen.requires_grad_(False)
    assert count_params(frozen) == 9
    a, b = nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False)
    b.weight = a.weight  # tied weights in distinct modules
    assert count_params(nn.ModuleList([a, b])) == 25


def test_latency_and_thread_restore():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    model.train()
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    r = measure_latency(model, (16, 16), threads=target, warmup=1, runs=7)
    assert torch.get_num_threads() == before
    assert r["threads"] == target
    assert r["latency_ms"] > 0
    assert r["min_ms"] <= r["p10_ms"] <= r["latency_ms"] <= r["p90_ms"]
    assert r["runs"] == 7 and r["warmup"] == 1 and r["batch_size"] == 1
    assert r["input_size"] == [16, 16] and r["device"] == "cpu"
    assert model.training


def test_latency_restores_threads_on_error():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(Boom(), (4, 4), threads=target, warmup=0, runs=1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kw", [{"runs": 0}, {"warmup": -1}, {"threads": 0}, {"batch_size": 0}])
def test_latency_bad_args(kw):
    with pytest.raises(ValueError):
        measure_latency(nn.Identity(), (4, 4), **kw)


def test_profile_model_keys():
    model = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    r = profile_model(model, (16, 16), threads=1, runs=2, warmup=0)
    assert r["params"] == 8 * 27
    assert r["flops"] == 2 * 8 * 27 * 256 and r["macs"] == r["flops"] // 2
    assert r["latency_ms"] == r["latency"]["latency_ms"] > 0
    assert r["latency"]["runs"] == 2


def test_cuda_graph_latency_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the graph path runs in benchmarks/gpu_check.py territory")
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        measure_latency(nn.Conv2d(3, 4, 1), (8, 8), cuda_graph=True, runs=1, warmup=0)
    r = measure_latency(nn.Conv2d(3, 4, 1), (8, 8), runs=1, warmup=0)
    assert "cuda_graph" not in r  # eager results keep the keys they had
