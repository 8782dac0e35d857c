import json
import os

import pytest
import torch
import torch.nn as nn

from segprune import checkpoint as ckpt
from segprune.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_into_model,
    load_json,
    load_metadata,
    load_state_dict,
    save_json,
    save_state_dict,
    torch_load_safe,
)


def _net(c=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 2, 1))


def _trained_net():
    net = _net()
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 8, 8))  # updates BN running stats
    return net


def test_round_trip_with_bn_buffers(tmp_path):
    net = _trained_net()
    path = tmp_path / "model.safetensors"
    save_state_dict(path, net.state_dict(), metadata={"arch": "toy", "epoch": "3"})
    state = load_state_dict(path)
    assert set(state) == set(net.state_dict())
    assert int(state["1.num_batches_tracked"]) == 1
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert load_metadata(path) == {"arch": "toy", "epoch": "3"}

    fresh = _net()
    fresh.load_state_dict({k: torch.zeros_like(v) for k, v in fresh.state_dict().items()})
    load_into_model(fresh, state, str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert not torch.equal(fresh[1].running_mean, torch.zeros(8))
    # not a pickle: no leftover temp files in the directory
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_shared_storage_and_noncontiguous_ok(tmp_path):
    w = torch.randn(4, 6)
    sd = {"a": w, "b": w, "c": w.t(), "d": w[:, 1:3]}
    save_state_dict(tmp_path / "s.safetensors", sd)
    out = load_state_dict(tmp_path / "s.safetensors")
    for k, v in sd.items():
        assert torch.equal(out[k], v)
    assert load_metadata(tmp_path / "s.safetensors") == {}


def test_non_tensor_value_names_key(tmp_path):
    with pytest.raises(TypeError, match="epoch"):
        save_state_dict(tmp_path / "x.safetensors", {"w": torch.ones(2), "epoch": 3})
    assert not (tmp_path / "x.safetensors").exists()


def test_truncated_file_names_file(tmp_path):
    path = tmp_path / "trunc.safetensors"
    save_state_dict(path, _net().state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_state_dict(tmp_path / "missing_trunc.safetensors")
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="trunc.safetensors"):
        load_metadata(path)


def test_load_into_model_reports_all_mismatches(tmp_path):
    state = _net(16).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["3.bias"]
    model = _net(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as ei:
        load_into_model(model, state, "runs/x/pruned.safetensors")
    msg = str(ei.value)
    assert "runs/x/pruned.safetensors" in msg
    assert "0.weight: file (16, 3, 3, 3) vs model (8, 3, 3, 3)" in msg
    assert "1.running_mean: file (16,) vs model (8,)" in msg
    assert "missing" in msg and "3.bias" in msg
    assert "unexpected" in msg and "extra.weight" in msg
    # nothing was modified
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_into_model_truncates_long_lists():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(CheckpointError, match=r"missing keys \(30\).*\(20 more\)"):
        load_into_model(model, {}, "empty.safetensors")


def test_atomic_write_crash_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    save_json(path, {"epoch": 1})

    def boom(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_json(path, {"epoch": 2})
    with pytest.raises(OSError):
        save_state_dict(tmp_path / "w.safetensors", {"a": torch.ones(3)})
    monkeypatch.undo()

    assert load_json(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temp files left


def test_atomic_write_replaces_and_creates_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]
    assert os.stat(path).st_mode & 0o077 == 0o666 & ~_umask() & 0o077


class Evil:  # module level so it can be pickled; weights_only must refuse it
    pass


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


def test_json_errors_name_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(CheckpointError, match=r"broken\.json.*line 4"):
        load_json(bad)
    with pytest.raises(CheckpointError, match="nope.json"):
        load_json(tmp_path / "nope.json")


def test_json_round_trip(tmp_path):
    obj = {"miou": 0.5, "names": ["road", "é"], "nested": {"x": [1, 2]}}
    save_json(tmp_path / "m.json", obj)
    assert load_json(tmp_path / "m.json") == obj
    assert json.loads((tmp_path / "m.json").read_text()) == obj
    with pytest.raises(TypeError):
        save_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()


def test_torch_load_safe(tmp_path):
    good = tmp_path / "w.pth"
    torch.save({"w": torch.arange(3)}, good)
    assert torch.equal(torch_load_safe(good)["w"], torch.arange(3))

    evil = tmp_path / "evil.pth"
    torch.save({"obj": Evil()}, evil)
    with pytest.raises(CheckpointError, match="evil.pth"):
        torch_load_safe(evil)
    with pytest.raises(CheckpointError, match="absent.pth"):
        torch_load_safe(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01junk")
    with pytest.raises(CheckpointError, match="junk.pth"):
        torch_load_safe(tmp_path / "junk.pth")


def test_weights_of_another_class_count_are_refused_and_model_unchanged():
    """A segmentation checkpoint for 5 classes loaded into a 7-class model: both class-dependent
    tensors are named with their shapes, and nothing is copied."""
    from segprune.models import build_model
    spec = {"name": "deeplabv3_resnet18", "width": 0.125, "output_stride": 16, "multi_grid": None,
            "aspp_channels": 16, "aspp_rates": None}
    five, seven = build_model(spec, 5, 4), build_model(spec, 7, 4)
    before = {k: v.clone() for k, v in seven.state_dict().items()}
    with pytest.raises(CheckpointError) as exc:
        load_into_model(seven, five.state_dict(), "five.safetensors")
    msg = str(exc.value)
    assert "five.safetensors" in msg and "file (5," in msg and "model (7," in msg
    assert all(torch.equal(v, before[k]) for k, v in seven.state_dict().items())


def test_in_stage_checkpoint_of_another_width_is_refused():
    """An in-stage checkpoint (engine.resume) taken from a wider network does not load into a
    narrower one: CheckpointError naming the file, for the module and for the optimizer state."""
    from torch import nn
    from segprune.engine.resume import load_module_tensors, load_optimizer_tensors, module_tensors, optimizer_tensors
    wide, narrow = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 6, 3)
    opt_w = torch.optim.SGD(wide.parameters(), lr=0.1, momentum=0.9)
    wide(torch.randn(1, 3, 5, 5)).sum().backward()
    opt_w.step()
    t = {**module_tensors("model", wide), **optimizer_tensors("opt", opt_w)}
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: in-stage checkpoint does not fit the model"):
        load_module_tensors("model", narrow, t, "partial.safetensors")
    opt_n = torch.optim.SGD(narrow.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: optimizer state opt\.0\.momentum_buffer"):
        load_optimizer_tensors("opt", opt_n, t, "partial.safetensors")
