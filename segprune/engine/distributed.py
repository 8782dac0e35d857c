"""Data-parallel training over several processes (``torchrun``), one model replica per process.

``torchrun --nproc_per_node=N -m segprune.cli run CONFIG --out DIR`` sets ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK``; :func:`launch` then starts the process group (``distributed.backend``: nccl
when CUDA is available, else gloo) and, with CUDA, puts rank r on ``cuda:LOCAL_RANK``. Without
those variables nothing here does anything: every helper is a no-op at world size 1 and a
single-process run computes exactly what it computed before this module existed.

How a k-process run reproduces the 1-process run at the same *global* batch B:

* **data**: :class:`ShardedBatchSampler` draws the 1-process permutation (torch's own
  ``RandomSampler`` + ``BatchSampler`` on the loader's seeded generator, consumed exactly as the
  1-process ``DataLoader`` consumes it), cuts it into the same global batches and gives rank r the
  contiguous slice ``[r B/k, (r+1) B/k)`` of each. ``LoaderCursor`` (in-stage resume) saves and
  restores the same generator, so a checkpoint written at one world size resumes at another.
* **loss**: a rank's loss is its *sum* over samples (segmentation: over non-ignored pixels)
  divided by the global count (:func:`global_count`, :func:`share`; the count stays on the device),
  so the sum over ranks is the 1-process mean even when the ranks hold different numbers of ignored
  pixels.
* **gradients**: torch's ``DistributedDataParallel`` (:func:`data_parallel`) over the modules a
  loop trains (MTP: one engine for W1, one for the segmentation network; ACoSP: the network and
  its mask logits), on every backend (gloo on the CPU, nccl on GPUs), with a communication hook that
  *sums* the gradients (DDP's default averages them). The all-reduce overlaps the backward pass and
  has completed when ``backward`` returns, before anything reads ``.grad`` (MTP's coupling and ℓ1
  steps, ℓ1 sub-gradients, CAP's guidance, the fp16 ``unscale_``); every replica then takes the same
  optimiser step, so weights, MTP's multipliers E and μ (computed from W1 - W3) and every other
  derived state stay identical without being communicated. The DDP wrapper lives only inside the
  loop and forwards the step's own function: the models are never replaced by it, so checkpoints
  hold the plain model (no ``module.`` prefix; :func:`unwrap` strips one anyway) and load at any
  world size. The loss values a loop logs are summed over ranks by ``engine.train.StepValues`` (every
  ``READ_EVERY`` steps; a direct ``MTP.step_w1`` call: :func:`sum_values`).
* **BatchNorm**: inside the training loops (:func:`replicated`) every ``nn.BatchNorm1d/2d/3d`` in
  train mode normalises with the statistics of the *global* batch (``distributed.sync_bn``,
  default true). On CUDA the layers become ``torch.nn.SyncBatchNorm`` for the loop. On the CPU
  ``torch.nn.SyncBatchNorm`` refuses the tensors ("SyncBatchNorm expected input tensor to be on
  GPU"), so the sync is implemented here (``_SyncBNFunction``): one all-reduce in the forward
  (per-channel sum, sum of squares and count, in float64) and one in the backward (per-channel
  sums of dy and dy·x̂), the exact gradient of the global-batch normalisation. Running statistics use the global mean and
  unbiased variance.
  The modules are switched by changing their class for the duration of the loop and switched
  back afterwards (same objects, parameters, buffers and hooks; ``state_dict`` keys unchanged),
  so pruning and saved checkpoints only ever see plain ``nn.BatchNorm2d``.
* **dropout**: ``nn.Dropout``/``nn.Dropout2d`` in train mode draw the mask of the global batch from
  the global generator (seeded identically on every rank) and keep their rank's slice, so the
  masks, and the generator's consumption, are those of the 1-process run.

Evaluation runs **sharded**: each rank evaluates a contiguous slice of the eval set
(:func:`eval_loader`, a :class:`RankShard` dataset) and the confusion matrix (segmentation) or
the correct/seen counts (classification) are all-reduced (exact integers), see
``engine.evaluate``. Latency is measured on rank 0 only.

Files: only rank 0 writes (stage files, ``partial.safetensors``, logs, metrics); the other ranks
wait at :func:`barrier` and read what rank 0 wrote, so the run folder must be on a file system
every node sees (checked at start-up).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import inspect
import os
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, Subset

__all__ = ["launched", "launch", "init", "teardown", "active", "is_main", "rank", "world", "device", "barrier",
           "all_true", "broadcast_object", "broadcast_module", "gather_object", "ShardedBatchSampler", "shard_sizes",
           "train_loader", "RankShard", "eval_loader", "is_sharded", "sum_over_ranks", "global_count", "share", "sum_values",
           "mean_over_ranks", "direct", "data_parallel", "replicated", "unwrap", "state_digest", "to_device"]

_STATE = {"rank": 0, "world": 1, "local_rank": 0, "device": torch.device("cpu"), "sync_bn": True, "owner": False}


def launched() -> bool:
    """True when the process was started by ``torchrun`` (``WORLD_SIZE`` and ``RANK`` are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(backend: str | None = None, timeout_s: float = 1800, sync_bn: bool = True, use_cuda: bool | None = None) -> bool:
    """Start the process group from the ``torchrun`` environment; False (and nothing done) without it.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ...; ``None`` = nccl when CUDA is used, else gloo.
        timeout_s: collective timeout in seconds (a rank that waits longer fails).
        sync_bn: global-batch BatchNorm statistics in the training loops (:func:`replicated`).
        use_cuda: put rank r on ``cuda:LOCAL_RANK``; ``None`` = when CUDA is available.
    """
    if not launched():
        return False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if use_cuda is None else bool(use_cuda)
    dev = torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    backend = backend or ("nccl" if cuda else "gloo")
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" and backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)), **kw)
        _STATE["owner"] = True
    _STATE.update(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, device=dev, sync_bn=bool(sync_bn))
    return True


def teardown() -> None:
    """Destroy the process group started by :func:`init` (if any) and reset to world size 1."""
    if _STATE["owner"] and dist.is_initialized():
        dist.destroy_process_group()
    _STATE.update(rank=0, world=1, local_rank=0, device=torch.device("cpu"), sync_bn=True, owner=False)


@contextlib.contextmanager
def launch(cfg: dict | None):
    """``with launch(cfg["distributed"]):`` init from the environment (if launched), teardown on exit."""
    cfg = cfg or {}
    dev = cfg.get("device")
    started = init(cfg.get("backend"), cfg.get("timeout_s", 1800), cfg.get("sync_bn", True),
                   None if dev is None else dev == "cuda")
    try:
        yield started
    finally:
        if started:
            teardown()


def world() -> int:
    return int(_STATE["world"])


def rank() -> int:
    return int(_STATE["rank"])


def active() -> bool:
    """True with more than one process: the only case in which anything is communicated."""
    return _STATE["world"] > 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return _STATE["rank"] == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when launched with CUDA, else CPU."""
    return _STATE["device"]


def to_device(*tensors: torch.Tensor, like: torch.Tensor | None = None):
    """Move tensors to ``like``'s device, and floating tensors to ``like``'s floating dtype.

    ``like`` is a parameter of the model the batch is fed to. The datasets yield float32 images;
    a model built in float64 (``torch.set_default_dtype(torch.float64)``, as the distributed
    equivalence tests do) receives them in float64. A float32 CPU model gets the same tensor
    objects back (nothing is copied).
    """
    dev = like.device if like is not None else device()
    dtype = like.dtype if like is not None and like.is_floating_point() else None
    out = tuple(t.to(dtype) if dtype is not None and t.is_floating_point() else t for t in tensors)
    if dev.type == "cpu":
        return out
    return tuple(t.to(dev, non_blocking=True) for t in out)


def _comm_device() -> torch.device:
    """Device of tensors handed to the backend (nccl needs CUDA tensors)."""
    return _STATE["device"] if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """All ranks wait for each other (no-op in a single process)."""
    if active():
        if _comm_device().type == "cuda":
            dist.barrier(device_ids=[_STATE["local_rank"]])
        else:
            dist.barrier()


def all_true(flag: bool) -> bool:
    """True if ``flag`` is true on every rank (a MIN all-reduce); ``flag`` in a single process."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if _comm_device().type == "cuda" else None)
    return box[0]


def gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a single process)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``module`` with rank ``src``'s (in place)."""
    if not active():
        return
    comm = _comm_device()
    for t in module.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        buf = t.detach().to(comm).contiguous()
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != t.data_ptr():
            t.copy_(buf)


def state_digest(tensors: Iterable[torch.Tensor], *scalars: float) -> str:
    """SHA-256 (16 hex digits) of the bytes of ``tensors`` and the ``repr`` of ``scalars``: equal
    digests on two ranks mean bitwise-identical values."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for s in scalars:
        h.update(repr(float(s)).encode())
    return h.hexdigest()[:16]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module of a ``DistributedDataParallel`` wrapper (``model`` itself otherwise), so
    that saved keys never carry a ``module.`` prefix."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- data ----------------------------------------------------------------------------------------
def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous slices of ``n`` items (the first ``n % parts`` one larger)."""
    base, extra = divmod(int(n), int(parts))
    return [base + (1 if i < extra else 0) for i in range(int(parts))]


class ShardedBatchSampler(Sampler[list[int]]):
    """Rank ``rank``'s slice of every global batch of the 1-process training loader.

    The global batches are those of ``DataLoader(ds, batch_size=B, shuffle=True, drop_last=...,
    generator=gen)``: a ``RandomSampler`` on ``gen`` (one ``randperm`` per epoch, drawn lazily,
    plus the trailing empty draw torch makes when the permutation is exhausted) batched by a
    ``BatchSampler``; the DataLoader built by :func:`train_loader` draws its worker base seed from
    the same generator first, as the 1-process loader does. So ``gen`` advances exactly as in the
    1-process run, and ``LoaderCursor`` can save/restore it. Rank r gets items
    ``[sum(sizes[:r]), sum(sizes[:r+1]))`` of each batch, ``sizes = shard_sizes(len(batch), world)``.

    Raises (on iteration):
        RuntimeError: a global batch too small to give every rank at least one item.
    """

    def __init__(self, batch_sampler: BatchSampler, rank: int, world: int):
        if not 0 <= int(rank) < int(world):
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.batch_sampler, self.rank, self.world = batch_sampler, int(rank), int(world)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            sizes = shard_sizes(len(batch), self.world)
            if min(sizes) == 0:
                raise RuntimeError(f"a global batch of {len(batch)} samples cannot be split over {self.world} processes")
            start = sum(sizes[:self.rank])
            yield list(batch[start:start + sizes[self.rank]])

    def __len__(self) -> int:
        return len(self.batch_sampler)


def train_loader(ds: Dataset, batch_size: int, seed: int, num_workers: int = 0, rank_: int | None = None,
                 world_: int | None = None) -> DataLoader:
    """This rank's shuffled training loader at global batch ``batch_size`` (see :class:`ShardedBatchSampler`).

    ``loader.generator`` is the seeded generator of the global order (as in ``make_loader``).
    """
    gen = torch.Generator().manual_seed(int(seed))
    drop_last = len(ds) >= batch_size
    bs = BatchSampler(RandomSampler(ds, generator=gen), int(batch_size), drop_last)
    r = rank() if rank_ is None else int(rank_)
    w = world() if world_ is None else int(world_)
    return DataLoader(ds, batch_sampler=ShardedBatchSampler(bs, r, w), num_workers=num_workers, generator=gen,
                      pin_memory=device().type == "cuda")  # page-locked batches for the non-blocking copy


class RankShard(Subset):
    """A contiguous slice of an eval dataset held by one rank; metrics over it are all-reduced."""


def eval_loader(ds: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Ordered eval loader over this rank's contiguous slice of ``ds`` (a :class:`RankShard`)."""
    sizes = shard_sizes(len(ds), world())
    start = sum(sizes[:rank()])
    return DataLoader(RankShard(ds, range(start, start + sizes[rank()])), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=device().type == "cuda")


def is_sharded(loader) -> bool:
    """True for a loader of :func:`eval_loader` in a multi-process run (its metric must be all-reduced)."""
    return active() and isinstance(getattr(loader, "dataset", None), RankShard)


# ---- reductions ----------------------------------------------------------------------------------
def global_count(n) -> torch.Tensor | None:
    """Sum over ranks of a count (a number, or a 0-d tensor on any device) as a 0-d float64 tensor on
    the backend's device (nccl: this rank's GPU; gloo: the CPU), read by nobody: no host
    synchronisation. ``None`` in a single process.

    Used as the denominator of a rank's summed loss (:func:`share`), so that the losses add up to the
    1-process mean.
    """
    if not active():
        return None
    comm = _comm_device()
    if isinstance(n, torch.Tensor):
        t = n.detach().to(torch.float64).reshape(1).to(comm)
    else:  # a fill on the device, not a copy from host memory (which would wait for the GPU)
        t = torch.full((1,), float(n), dtype=torch.float64, device=comm)
    dist.all_reduce(t)
    return t.reshape(())


def share(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``total / count`` in ``total``'s dtype: a rank's summed loss as its share of the global mean
    (``count`` from :func:`global_count`, cast to ``total``'s dtype first, as a Python number is)."""
    return total / count.to(total.dtype)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks, a new tensor of ``x``'s dtype and device (a copy of ``x`` in a single process)."""
    y = x.detach().to(_comm_device(), copy=True)
    if active():
        dist.all_reduce(y)
    return y.to(x.device)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself in a single process); ``x``'s dtype and device kept."""
    if not active():
        return x
    y = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(y)
    return (y / world()).to(x.device, x.dtype)


def sum_values(*values) -> list[float]:
    """Sums over ranks of ``values`` (numbers or 0-d tensors on any device, e.g. a rank's loss share and
    counts), as floats, in one float64 all-reduce; in a single process the values themselves as floats.
    One host synchronisation either way."""
    vals = [float(v) for v in values]
    if not active():
        return vals
    t = torch.tensor(vals, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


# ---- gradients: torch's DistributedDataParallel ------------------------------------------------------
def _sum_hook(state, bucket):
    """DDP communication hook (``hook(state, bucket: dist.GradBucket) -> Future[Tensor]``; no annotations,
    DDP compares them by identity): the bucket's gradients **summed** over ranks. DDP's default divides
    by the world size; the training loops make every rank's loss its share of the global mean
    (:func:`global_count`), so the sum is the 1-process gradient, bit for bit the sum the loss shares
    define (no extra multiplication or division)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


class _Trained(nn.Module):
    """The modules whose gradients one DDP instance synchronises. ``forward(fn, *args)`` is ``fn(*args)``:
    the training step's own forward (the model, its auxiliary heads, ``forward_cls``, a loss) runs through
    DDP's ``forward`` without DDP having to know it. Never saved (the modules keep their own names)."""

    def __init__(self, modules):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, fn, *args):
        return fn(*args)


def direct(fn, *args):
    """``fn(*args)``: the ``run`` of :func:`data_parallel` in a single process (nothing synchronised)."""
    return fn(*args)


def _ddp_buffer_kw() -> dict:
    """No buffer broadcast before every forward (the BN running statistics are those of the global batch
    on every rank with ``sync_bn``, and rank-local without, as before DDP was used). torch >= 2.13 names
    the option ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated there)."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


@contextlib.contextmanager
def data_parallel(*modules: nn.Module):
    """Inside: ``run(fn, *args)`` returns ``fn(*args)``, computed so that the ``backward`` of its result
    leaves on every rank the gradients of ``modules``' parameters **summed over ranks** (a
    ``torch.nn.parallel.DistributedDataParallel`` over ``modules``, all-reduce overlapped with the
    backward pass). In a single process ``run`` is a plain call (nothing changes).

    ``fn`` must use the parameters only through autograd-visible computation and may return any
    structure of tensors (logits, (main, aux) tuples, a loss). Use one ``run`` per forward/backward
    pair; ``loss.backward()`` returns once the sums are in ``.grad``, so whatever runs after it
    (MTP's coupling and ℓ1 steps, ℓ1 sub-gradients, CAP's guidance, ``GradScaler.unscale_``) sees the
    synchronised gradient.

    Settings and why:

    * summed, not averaged (:func:`_sum_hook`): the loss normalisation of the loops
      (:func:`global_count`) makes the sum the 1-process gradient;
    * ``find_unused_parameters=True``: which parameters a step reaches depends on the model and the
      method (the classification head ``fc`` in segmentation training, the unused decoder of MTP's W1
      copy of a ``segprune.api`` model, ACoSP's logits of units that keep every channel or once the
      mask is hard). DDP then leaves the ``.grad`` of a parameter unused on every rank untouched
      (``None`` after ``zero_grad(set_to_none=True)``), so SGD skips it, as in one process;
    * no buffer broadcast before each forward (:func:`_ddp_buffer_kw`); parameters and buffers are
      broadcast from rank 0 once, when the engine is built (DDP's ``init_sync``), after the shapes have
      been compared across ranks (a rank with another model fails there);
    * on CUDA, ``device_ids=[LOCAL_RANK]``.

    Parameters changed outside autograd (MTP's coupling and proximal ℓ1 steps, E, μ) are not
    communicated: every rank applies the same update to the same values. ``no_sync`` is not used
    (every backward is followed by an optimiser step, no gradient accumulation).
    """
    if not active():
        yield direct
        return
    dev = _STATE["device"]
    kw = {"device_ids": [dev.index if dev.index is not None else _STATE["local_rank"]]} if dev.type == "cuda" else {}
    engine = nn.parallel.DistributedDataParallel(_Trained(modules), find_unused_parameters=True,
                                                 **_ddp_buffer_kw(), **kw)
    engine.register_comm_hook(None, _sum_hook)
    try:
        yield engine
    finally:
        del engine  # its reducer's autograd hooks go with it


# ---- BatchNorm sync and rank-sliced dropout inside the training loops ------------------------------
class _SyncBNFunction(torch.autograd.Function):
    """Train-mode BatchNorm over the global batch: one all-reduce in the forward (per-channel sum,
    sum of squares and count, float64) and one in the backward (per-channel sums of dy and dy·x̂),
    as ``torch.nn.SyncBatchNorm`` does on GPUs. Returns (y, batch mean, biased batch variance,
    global count per channel)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        c = x.shape[1]
        xd = x.detach().to(torch.float64, copy=True)  # a copy even for a float64 x (squared in place below)
        n_local = xd.numel() // max(1, c)
        stats = torch.cat([xd.sum(dims), xd.square_().sum(dims), xd.new_tensor([float(n_local)])])
        del xd
        comm = _comm_device()
        stats = stats.to(comm)
        dist.all_reduce(stats)
        stats = stats.to(x.device)
        n = stats[-1]  # a tensor: no host synchronisation on a GPU
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # float64: no cancellation worth the name
        invstd = torch.rsqrt(var + eps).to(x.dtype)
        xhat = (x - mean.to(x.dtype).view(shape)) * invstd.view(shape)
        y = xhat if weight is None else xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight, n)
        ctx.dims, ctx.shape = dims, shape
        count = stats[-1:].clone()
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _mean, _var, _count):
        xhat, invstd, weight, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        dx = None
        if ctx.needs_input_grad[0]:  # the same on every rank (same graph): the collective stays matched
            g = torch.cat([sum_dy, sum_dy_xhat]).double().to(_comm_device())
            dist.all_reduce(g)
            g = g.to(dy.device)
            c = sum_dy.numel()
            mean_dy, mean_dy_xhat = (g[:c] / n).to(dy.dtype), (g[c:] / n).to(dy.dtype)
            scale = invstd if weight is None else invstd * weight
            dx = (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape)) * scale.view(shape)
        has_w = weight is not None
        return (dx, sum_dy_xhat if has_w and ctx.needs_input_grad[1] else None,
                sum_dy if has_w and ctx.needs_input_grad[2] else None, None)


class _SyncBNMixin:
    """Train-mode forward of a BatchNorm with the global batch's statistics (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active() and _STATE["sync_bn"]):
            return super().forward(x)
        self._check_input_dim(x)
        eaf = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            eaf = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        y, mean, var, count = _SyncBNFunction.apply(x, self.weight if self.affine else None,
                                                    self.bias if self.affine else None, float(self.eps))
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                n = count.clamp_min(2.0)
                self.running_mean.mul_(1.0 - eaf).add_(mean.to(self.running_mean.dtype), alpha=eaf)
                self.running_var.mul_(1.0 - eaf).add_((var * n / (n - 1.0)).to(self.running_var.dtype), alpha=eaf)
        return y


class _SlicedDropoutMixin:
    """Train-mode dropout whose mask is rank r's slice of the global batch's mask."""

    feature = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = float(self.p)
        if not (self.training and active()) or p in (0.0, 1.0) or x.numel() == 0:
            return super().forward(x)  # no mask is drawn in these cases
        n, w, r = x.shape[0], world(), rank()
        shape = [n * w] + (list(x.shape[1:2]) + [1] * (x.dim() - 2) if self.feature else list(x.shape[1:]))
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)[r * n:(r + 1) * n]
        noise.div_(1.0 - p)
        return x.mul_(noise) if self.inplace else x * noise


_SWAPS: dict[type, type] = {}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _torch_sync_bn() -> bool:
    """True when BatchNorms are synchronised by ``torch.nn.SyncBatchNorm`` (this rank's device is CUDA);
    False on the CPU, where torch's refuses the tensors and :class:`_SyncBNMixin` does it."""
    return _STATE["device"].type == "cuda"


def _swapped(cls: type) -> type | None:
    if cls in _BATCHNORMS:
        if _torch_sync_bn():
            return nn.SyncBatchNorm
        mixin, attrs = _SyncBNMixin, {}
    elif cls is nn.Dropout:
        mixin, attrs = _SlicedDropoutMixin, {"feature": False}
    elif cls is nn.Dropout2d:
        mixin, attrs = _SlicedDropoutMixin, {"feature": True}
    else:
        return None
    if cls not in _SWAPS:
        _SWAPS[cls] = type(f"Replicated{cls.__name__}", (mixin, cls), attrs)
    return _SWAPS[cls]


@contextlib.contextmanager
def replicated(*modules: nn.Module):
    """Inside: the BatchNorms (``nn.BatchNorm1d/2d/3d``, exact types) of ``modules`` use global-batch
    statistics in train mode (if ``distributed.sync_bn``) and ``nn.Dropout``/``nn.Dropout2d`` draw
    rank-sliced global masks. The modules keep their identity, parameters, buffers, hooks and
    ``state_dict`` keys; their classes are restored on exit (also on errors). Subclasses of these
    layers (a user's own BatchNorm) are left alone. No-op in a single process.

    BatchNorm on CUDA: the layer *becomes* a ``torch.nn.SyncBatchNorm`` (its class is set to it and
    ``process_group`` to ``None``, the default group: the state ``SyncBatchNorm.convert_sync_batchnorm``
    gives a new module, which holds the same parameter and buffer tensors). The module is not replaced
    as ``convert_sync_batchnorm`` replaces it, because the methods hold the BatchNorm modules
    themselves: ACoSP's masks, CAP's guidance and SIRFP's statistics are forward hooks on them, and
    the pruning units name them. On the CPU, segprune's own ``_SyncBNFunction`` (torch's refuses CPU
    tensors).
    """
    if not active():
        yield
        return
    changed: list[tuple[nn.Module, type]] = []
    try:
        for root in modules:
            for m in root.modules():
                new = _swapped(type(m))
                if new is None or (new is nn.SyncBatchNorm and not _STATE["sync_bn"]):
                    continue
                changed.append((m, type(m)))
                m.__class__ = new
                if new is nn.SyncBatchNorm:
                    m.process_group = None
        yield
    finally:
        for m, cls in changed:
            if type(m) is nn.SyncBatchNorm:
                del m.process_group
            m.__class__ = cls
