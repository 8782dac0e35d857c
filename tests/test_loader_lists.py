"""segprune.api.prune_model with plain lists of batches instead of DataLoaders (issue 17)."""
import pytest
import torch
from torch import nn

from segprune.api import prune_model
from segprune.engine.resume import LoaderCursor, check_loader

K, K_CLS, S = 3, 4, 16


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, K, 1)
        self.enc_fc = nn.Linear(8, K_CLS)

    def forward(self, x):
        return self.head(self.dec(self.enc(x)))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = [(torch.randn(2, 3, S, S, generator=g), torch.randint(0, K, (2, S, S), generator=g)) for _ in range(n)]
    cls = [(torch.randn(2, 3, S, S, generator=g), torch.randint(0, K_CLS, (2,), generator=g)) for _ in range(n)]
    return seg, cls


KW = dict(keep_ratio=0.5, parts={"backbone": "enc.", "decoder": "dec."}, never_prune=["head"], input_size=(S, S))


@pytest.mark.parametrize("method", ["slimming", "mtp"])
def test_lists_of_batches_train_prune_and_finetune(method):
    seg, cls = _batches()
    torch.manual_seed(0)
    res = prune_model(Tiny(), method, seg_loader=seg, cls_loader=cls, cls_head="enc_fc",
                      method_cfg={"epochs": 2}, finetune={"cls": {"epochs": 2}, "seg": {"epochs": 2}}, **KW)
    ft = res.report["finetune"]
    assert ft["seg"]["iters"] == 6 and ft["cls"]["iters"] == 6     # 2 epochs x 3 batches each
    assert res.report["params"]["after"] < res.report["params"]["before"]
    assert res.model.eval()(seg[0][0]).shape == (2, K, S, S)


def test_one_shot_iterators_get_a_clear_error_before_training():
    seg, cls = _batches()
    with pytest.raises(TypeError, match=r"seg_loader is a one-shot iterator \(generator\).*list of batches"):
        prune_model(Tiny(), "slimming", seg_loader=(b for b in seg), **KW)
    with pytest.raises(TypeError, match=r"cls_loader is a one-shot iterator"):
        prune_model(Tiny(), "mtp", seg_loader=seg, cls_loader=iter(cls), cls_head="enc_fc", **KW)
    with pytest.raises(TypeError, match=r"seg_loader must be a DataLoader or a list of batches"):
        prune_model(Tiny(), "slimming", seg_loader=42, **KW)


class _NoLen:
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_loader_cursor_accepts_lists_and_refuses_what_it_cannot_count():
    seg, _ = _batches()
    cur = LoaderCursor(seg)
    assert [b[0].sum() for b in cur.batches(0, skip=1)] == [b[0].sum() for b in seg[1:]]
    assert cur.epoch_state.numel() == 0          # nothing to restore: a list's order is fixed
    with pytest.raises(TypeError, match=r"data \(_NoLen\) has no len\(\)"):
        check_loader(_NoLen(seg), "data")


def test_the_check_does_not_consume_a_dataloaders_generator():
    """Creating a DataLoader iterator draws a seed from loader.generator; the check must not do it."""
    from torch.utils.data import DataLoader, TensorDataset
    g = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=2, shuffle=True, generator=g)
    before = g.get_state().clone()
    check_loader(loader, "seg_loader")
    assert torch.equal(g.get_state(), before)
