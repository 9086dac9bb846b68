"""Weight sharing: one network that contains every width-aligned candidate of a space at a
budget, so a candidate is evaluated in seconds instead of trained.

The supernet is the space's model at the *envelope* plan: the widest candidate the budget
allows (every free layer at the lowest bit choice, width-aligned) plus the most channels
width alignment may add to each stage (``SearchSpace.top_up_limits``), so every aligned
candidate's channel plan fits inside it. A candidate is the leading channels of every
tensor (the slimmable-network convention of BigNAS, Yu et al. 2020, and OFA, Cai et al.
2020): channel c of a layer's output feeds channel c of the next, residual additions keep
one plan key, so leading slices are consistent. Its weights are quantized on the fly from
the shared float weights, at the candidate's per-layer bits, by the same quantized layers
the stand-alone trials use (:func:`qsearch.qlayers.quantize_model`); bits and widths are
searched jointly as in OQAT (Shen et al. 2021) and BatchQuant (Bai et al. 2021).

Training (:class:`SandwichHooks`, one step of the one training loop) follows BigNAS: the
sandwich rule - the largest network (the widest aligned width at the highest bit choice) on
the labels; the smallest (the narrowest aligned width at the lowest bits) and a random
aligned candidate distilled in place from the largest's soft predictions - each its own
backward pass. BigNAS samples two random networks; one keeps a supernet step within 3x of
a stand-alone step of the widest candidate (measured 2.4x for ResNet-20 at 32KB on one CPU
thread; 3.2x with two). BatchNorm statistics are not shared: before a candidate is
evaluated they are recomputed on a few training batches (BigNAS Sec. 3.3;
:func:`recalibrate`). The stage channels beyond the widest candidate (the top-up
allowance) are trained only by the candidates that use them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.candidate import Candidate
from qsearch.data import Splits
from qsearch.qlayers import quantize_model
from qsearch.space import SearchSpace
from qsearch.train import TrainHooks, evaluate

SCHEME = "dualprecision"  # the weight quantizer of the `train` task's trials
RECAL_BATCHES = 8  # training batches of 128 that recompute a candidate's BN statistics
EVAL_IMAGES = 2000  # validation images a supernet evaluation reads


class Supernet:
    """The envelope of a space at a budget and how candidates are cut out of it.

    ``sample`` draws aligned candidates; ``forward`` runs a candidate on the shared weights
    (gradients reach them); ``extract`` copies a candidate out as a stand-alone quantized
    model. Candidates outside the envelope are refused.
    """

    def __init__(self, space: SearchSpace, budget: Budget, *, scheme: str = SCHEME):
        self.space, self.budget, self.scheme = space, budget, scheme
        lo, hi = min(space.bit_choices), max(space.bit_choices)
        self.widest = space.fit(space.candidate(lo), budget)
        self.narrowest = space.fit(space.candidate(hi), budget)  # a fixed width: the same
        self.smallest = Candidate(space.candidate(lo).w_bits, space.a_bits,
                                  self.narrowest.width)
        self.largest = Candidate(space.candidate(hi).w_bits, space.a_bits,
                                 self.widest.width, self.widest.channels)
        channels = () if space.family.fixed_width else tuple(
            space.top_up_limits(self.widest.width).items())
        self.envelope = Candidate(self.largest.w_bits, space.a_bits, self.widest.width,
                                  channels)
        self._skeletons: OrderedDict[Candidate, nn.Module] = OrderedDict()

    def describe(self) -> dict:
        """What the supernet's weights depend on, as plain data (its cache key)."""
        return {"space": self.space.describe(), "budget": str(self.budget),
                "scheme": self.scheme, "envelope": self.envelope.to_dict()}

    def build(self) -> nn.Module:
        """The trainable supernet, holding the shared weights: the envelope as a model."""
        return self._quantized(self.space.build(self.envelope), self.envelope)

    def sample(self, generator: torch.Generator | None = None) -> Candidate:
        """A random aligned candidate: half the draws one bit choice for every free layer,
        half an independent choice per free layer (torch's RNG, so resumed runs redraw)."""
        choices = self.space.bit_choices
        n = len(self.space.free_layers)
        pick = torch.randint(len(choices), (n,), generator=generator).tolist()
        if torch.rand((), generator=generator) < 0.5:
            pick = [pick[0]] * n
        return self.space.fit(self.space.candidate([choices[i] for i in pick]), self.budget)

    def _quantized(self, model: nn.Module, cand: Candidate) -> nn.Module:
        return quantize_model(model, self.space.layer_bits(cand), cand.a_bits,
                              scheme=self.scheme)

    def skeleton(self, cand: Candidate) -> nn.Module:
        """The candidate's quantized model on the meta device (no storage), cached."""
        if cand not in self._skeletons:
            with torch.device("meta"):
                net = self.space.build(cand)
            self._skeletons[cand] = self._quantized(net, cand)
            if len(self._skeletons) > 64:
                self._skeletons.popitem(last=False)
        self._skeletons.move_to_end(cand)
        return self._skeletons[cand]

    def slices(self, supernet: nn.Module, cand: Candidate) -> dict[str, torch.Tensor]:
        """The candidate's parameters and buffers: leading slices (views) of the supernet's."""
        shared = dict(itertools.chain(supernet.named_parameters(), supernet.named_buffers()))
        net = self.skeleton(cand)
        out = {}
        for name, t in itertools.chain(net.named_parameters(), net.named_buffers()):
            big = shared.get(name)
            if big is None or big.dim() != t.dim() or any(
                    s > b for s, b in zip(t.shape, big.shape)):
                raise QSearchError(
                    f"candidate (width {cand.width:.4g}) does not fit this supernet: {name} "
                    f"{tuple(t.shape)} against {None if big is None else tuple(big.shape)}; "
                    f"it was built for {self.space.model} at {self.budget}: use that budget")
            out[name] = big if t.shape == big.shape else big[tuple(slice(0, s)
                                                                    for s in t.shape)]
        return out

    def forward(self, supernet: nn.Module, cand: Candidate, x: torch.Tensor) -> torch.Tensor:
        """The candidate's output on the shared weights, in the supernet's train/eval mode."""
        net = self.skeleton(cand).train(supernet.training)
        return functional_call(net, self.slices(supernet, cand), (x,))

    @torch.no_grad()
    def extract(self, supernet: nn.Module, cand: Candidate) -> nn.Module:
        """The candidate as a stand-alone quantized model holding copies of its weights."""
        with torch.device("meta"):
            net = self.space.build(cand)
        net = self._quantized(net, cand)
        net.load_state_dict({k: v.detach().clone() for k, v in self.slices(supernet, cand)
                             .items()}, assign=True)
        return net.train(supernet.training)


@torch.no_grad()
def recalibrate(model: nn.Module, splits: Splits, *, batches: int = RECAL_BATCHES,
                batch_size: int = 128, device: str = "cpu") -> None:
    """Recompute every BatchNorm's running statistics as the exact average over ``batches``
    training batches (no augmentation, a fixed order), then leave the model in eval mode.
    Only BatchNorm runs in training mode: activation ranges stay as the supernet learned
    them."""
    from qsearch.ptq import estimating

    order = torch.Generator().manual_seed(0)
    with estimating(model, batchnorm=True, act_ranges=False):
        for x, _ in itertools.islice(splits.train.batches(batch_size, shuffle=True,
                                                          generator=order), batches):
            model(x.to(device))


class _Head:
    """The first ``n`` images of a split, as a split (a cheaper validation)."""

    def __init__(self, split, n: int):
        self.split, self.n, self.device = split, min(n, len(split)), split.device

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, **kw) -> Iterator[tuple]:
        left = self.n
        for x, y in self.split.batches(batch_size, **kw):
            if left <= 0:
                return
            yield x[:left], y[:left]
            left -= len(y)


def evaluate_candidate(supernet: Supernet, model: nn.Module, cand: Candidate, splits: Splits,
                       *, device: str = "cpu", recal_batches: int = RECAL_BATCHES,
                       eval_images: int = EVAL_IMAGES) -> tuple[float, float]:
    """Validation accuracy and loss of ``cand`` cut out of the trained ``model``: extract,
    recalibrate BatchNorm, evaluate on the first ``eval_images`` validation images."""
    net = supernet.extract(model, cand)
    recalibrate(net, splits, batches=recal_batches, device=device)
    return evaluate(net, _Head(splits.val, eval_images), device=device)


class SandwichHooks(TrainHooks):
    """BigNAS's sandwich rule with in-place distillation, as a training-loop hook.

    Each step: the largest network on the labels, then the smallest and ``random``
    sampled candidates (one by default, see the module docstring), each on the largest's
    soft predictions (cross-entropy with probability targets), each its own backward pass.
    Evaluations report the aligned uniform candidates (one per bit choice), recalibrated:
    ``val_acc`` is their mean.
    """

    data_parallel = False  # sub-networks change every step: not one DDP graph

    def __init__(self, supernet: Supernet, *, random: int = 1,
                 eval_images: int = EVAL_IMAGES):
        self.supernet, self.random, self.eval_images = supernet, random, eval_images

    def forward_backward(self, model, x, y, criterion, step):
        out = self.supernet.forward(model, self.supernet.largest, x)
        task = criterion(out, y)
        task.backward()
        soft = out.detach().softmax(1)
        students = [self.supernet.smallest] + [self.supernet.sample()
                                               for _ in range(self.random)]
        distill = 0.0
        for cand in students:
            loss = F.cross_entropy(self.supernet.forward(model, cand, x), soft)
            loss.backward()
            distill = distill + loss.detach()
        return task.detach(), {"distill_loss": distill / len(students)}

    def evaluate(self, model, splits, metrics, *, batch_size, device):
        if len(splits.val) == 0:
            return {}
        out, space, budget = {}, self.supernet.space, self.supernet.budget
        for b in space.bit_choices:
            cand = space.fit(space.candidate(b), budget)
            if len(set(cand.w_bits[i] for i in space.free_layers)) > 1:
                continue  # a fixed-width model over budget at b bits: not a uniform one
            out[f"val_acc_{b}b"], _ = evaluate_candidate(
                self.supernet, model, cand, splits, device=device,
                eval_images=self.eval_images)
        out["val_acc"] = sum(out.values()) / len(out)
        return out
