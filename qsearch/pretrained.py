"""A pretrained starting point (``--checkpoint FILE``): read a float ``state_dict`` and load it
into a space's model before it is quantized.

The file is read with ``torch.load(weights_only=True)``: a plain ``state_dict``, qsearch's own
training state (``{"model": ...}``), a ``{"state_dict": ...}`` wrapper, or a torchvision weights
file from a local path. Two differences are adapted, as fine-tuning practice does, and said
in the notes: an RGB stem read by a 1-channel dataset (its kernel summed over the colour
channels: a grey image repeated three times gives the same response), and a classifier with
another number of classes (left at its initialisation, to be learnt by fine-tuning). Anything
else that differs is one error naming the first missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qsearch import QSearchError

if TYPE_CHECKING:
    import torch.nn as nn
    from torch import Tensor

FINETUNE = {"lr": 0.01}  # fine-tuning recipe defaults under the user's own train settings
_READ: dict = {}  # (path, mtime) -> state_dict: one read per process


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (cached per process while the file is unchanged)."""
    import torch

    if not os.path.isfile(path):
        raise QSearchError(f"checkpoint {path!r} not found: pass a file saved with "
                           "torch.save(model.state_dict(), path)")
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _READ:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise QSearchError(f"checkpoint {path!r} is not a state_dict readable with "
                               f"weights_only=True ({type(e).__name__}: {str(e)[:200]}): save "
                               "it with torch.save(model.state_dict(), path)") from None
        for wrapper in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise QSearchError(f"checkpoint {path!r} holds no mapping of tensor names to "
                               "tensors: save it with torch.save(model.state_dict(), path)")
        _READ.clear()
        _READ[key] = state
    return _READ[key]


def matched(model: nn.Module, state: dict[str, Tensor], path: str,
            model_name: str) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors of ``state`` to load into ``model`` and notes on what was adapted."""
    own = model.state_dict()
    head = _classifier(model)
    out, notes = {}, []
    for name, want in own.items():
        have = state.get(name)
        if have is None:
            if name.endswith("num_batches_tracked"):
                continue
            raise QSearchError(f"checkpoint {path!r} has no tensor {name!r} of {model_name}: "
                               "pass a state_dict of this model")
        if have.shape == want.shape:
            out[name] = have
        elif have.dim() == 4 and have.shape[1] == 3 and want.shape[1] == 1 \
                and have.shape[0] == want.shape[0] and have.shape[2:] == want.shape[2:]:
            out[name] = have.sum(dim=1, keepdim=True)
            notes.append(f"{name} summed over its 3 colour channels for 1-channel images")
        elif name.rpartition(".")[0] == head and have.shape[1:] == want.shape[1:]:
            if name.endswith("weight"):
                notes.append(f"classifier {head} left at its initialisation (the checkpoint "
                             f"has {have.shape[0]} classes, the dataset {want.shape[0]})")
        else:
            raise QSearchError(f"checkpoint {path!r}: tensor {name!r} has shape "
                               f"{tuple(have.shape)}, {model_name} needs {tuple(want.shape)}: "
                               "pass a state_dict of this model (and width)")
    extra = sorted(set(state) - set(own))
    if extra:
        raise QSearchError(f"checkpoint {path!r} has tensor {extra[0]!r}, which {model_name} "
                           "does not: pass a state_dict of this model")
    return out, notes


def load_pretrained(model: nn.Module, path: str, model_name: str) -> list[str]:
    """Load the checkpoint into the float ``model`` in place; the notes of :func:`matched`."""
    tensors, notes = matched(model, read_state_dict(path), path, model_name)
    model.load_state_dict(tensors, strict=False)
    return notes


def _classifier(model: nn.Module) -> str | None:
    """Name of the model's last Linear (its classifier), if it has one."""
    import torch.nn as nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None
