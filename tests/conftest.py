"""Shared test settings and fixtures.

``TINY``: the tiny synthetic run config (a width-0.125 DeepLabv3-R18 at 32x32, one epoch per stage)
that the pipeline, sweep, resume, DDP and method tests build on; tests that change it copy it first
(``tiny_config`` gives a fresh deep copy).
"""
import copy

import pytest
import torch



@pytest.fixture(autouse=True)
def _one_thread():
    """Tests are tiny: one intra-op thread is faster and deterministic on a 2-core CI box."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


#: the tiny synthetic run config shared by the end-to-end tests (do not mutate: use ``tiny_config``)
TINY = {
    "seed": 3,
    "threads": 1,
    "model": {"name": "deeplabv3_resnet18", "width": 0.125, "aspp_channels": 16, "output_stride": 16},
    "data": {
        "seg": {"name": "synthetic", "input_size": [32, 32], "crop_size": [32, 32], "image_size": [32, 32],
                "num_train": 16, "num_eval": 8, "batch_size": 4, "eval_batch_size": 8},
        "cls": {"name": "synthetic", "input_size": [16, 16], "image_size": [16, 16], "num_train": 32, "num_eval": 16,
                "batch_size": 8, "eval_batch_size": 16},
    },
    "train": {"pretrain_cls": {"epochs": 1, "lr": 0.05}, "seg": {"epochs": 2, "lr": 0.02}},
    "method": {"epochs": 1, "alpha1": 0.05, "alpha2": 0.05, "mu0": 0.1, "rho": 1.2, "mu_max": 5.0, "update_every": 1},
    "prune": {"keep_ratio": 0.5, "threshold_mode": "ind", "min_channels": 1},
    "finetune": {"cls": {"epochs": 1, "lr": 0.01}, "seg": {"epochs": 1, "lr": 0.01}},
    "eval": {"latency_runs": 2, "latency_warmup": 1},
}


@pytest.fixture
def tiny_config() -> dict:
    """A deep copy of :data:`TINY` to modify."""
    return copy.deepcopy(TINY)


def random_seg_batches(n: int = 3, size: int = 32):
    """A shuffled loader of ``n`` random segmentation batches of 4: images (4, 3, size, size), labels
    (4, size, size) in 0..4 (5 classes, the tiny model's); fixed generators, so every call is the same."""
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4 * n, 3, size, size, generator=g), torch.randint(0, 5, (4 * n, size, size), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))


def random_cls_batches(n: int = 3):
    """A shuffled loader of ``n`` random classification batches of 4: images (4, 3, 16, 16), targets in 0..3."""
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4 * n, 3, 16, 16, generator=g), torch.randint(0, 4, (4 * n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
