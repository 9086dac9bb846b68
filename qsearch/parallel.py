"""Data parallelism for the one training loop (:func:`qsearch.train.train`), Ray-free.

A trial with N workers runs N processes; each calls ``train()`` with its :class:`Shard`. The
process group is set up by whoever started the processes (Ray Train's ``TorchTrainer``:
gloo on CPU, NCCL on GPU, see :mod:`qsearch.ray_train`); this module only uses
``torch.distributed``'s default group.

The global batch rule: ``batch_size`` is the batch of one optimiser step, whatever the
number of workers. Each of the N workers trains on its own 1/N of every global batch (the
same images, order and augmentations a single process would draw), DDP averages the
gradients, so one step is the single-process step on the same global batch and the learning
rate and its schedule stay as they are (no linear scaling: the batch did not grow). The
differences left are BatchNorm statistics, computed per worker over batch/N images, and
floating-point summation order. To train with a larger global batch, raise ``batch_size``
and ``lr`` together (Goyal et al. 2017's linear scaling rule is the usual guide).
"""

from __future__ import annotations

from dataclasses import dataclass

from qsearch import QSearchError


@dataclass(frozen=True)
class Shard:
    """This process's place among the ``world`` workers of one trial (``rank`` 0 leads: it
    evaluates, reports and saves the checkpoints)."""

    rank: int
    world: int
    device: str = "cpu"  # where collectives run: CPU for gloo, this worker's GPU for NCCL

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise QSearchError(f"worker rank {self.rank} is outside 0..{self.world - 1}")

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def part(self, batch_size: int) -> tuple[int, int]:
        """Start and size of this worker's slice of a global batch of ``batch_size``."""
        if batch_size % self.world:
            raise QSearchError(f"batch size {batch_size} does not split over {self.world} "
                               f"workers: use a multiple of {self.world}")
        size = batch_size // self.world
        return self.rank * size, size

    def wrap(self, model, *, n_train: int, batch_size: int, data_parallel: bool = True,
             what: str = "this training"):
        """``model`` in DistributedDataParallel (gradients averaged over the workers,
        BatchNorm buffers broadcast from rank 0 at each forward), once the run is known to
        split: ``n_train`` images in global batches of ``batch_size``. ``data_parallel``
        False (hooks that change the model's parameters mid-run) is refused."""
        import torch
        from torch.nn.parallel import DistributedDataParallel

        if not data_parallel:
            raise QSearchError(f"{what} changes the model during training and cannot run on "
                               "several workers: use --workers-per-trial 1")
        if n_train < batch_size:
            raise QSearchError(f"the training split ({n_train} images) is smaller than one "
                               f"global batch ({batch_size}): lower --batch-size or use "
                               "--workers-per-trial 1")
        self.part(batch_size)
        device = torch.device(self.device)
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, values: list[float]) -> list[float]:
        """The mean over workers of each value (a non-finite value anywhere makes the mean
        non-finite everywhere: every worker then sees the divergence at the same step)."""
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def agree(self, decision: bool) -> bool:
        """Rank 0's ``decision``, on every worker."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(decision)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def gather(self, value) -> list:
        """``value`` of every worker, by rank (any picklable value)."""
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values
