"""Models that are not a registered family: torchvision builders and user factories.

- ``torchvision:NAME``: any torchvision classification builder (``resnet18``,
  ``mobilenet_v3_small``, ``efficientnet_b0``, ...), built with ``weights=None`` (nothing is
  downloaded). torchvision's stems read 3-channel images: for another ``in_channels`` the
  first Conv2d is replaced by one of the same shape reading ``in_channels`` channels.
- ``path/to/file.py:fn`` or ``package.module:fn``: a factory
  ``fn(*, num_classes, in_channels) -> nn.Module``, optionally taking ``width`` too.

Either becomes a *fixed-width* :class:`~qsearch.spaces.Family` (``fixed_width=True``): the
model keeps its own channel counts, ``plan(width)`` is ``{}`` and the cost model reads every
layer's shape from one trace (:mod:`qsearch.inventory`); budgets are met through the bits.
A factory that takes ``width`` is a width family instead (``Family.user_width``): width
alignment solves its width as for the zoo (:mod:`qsearch.factory_width`).
Errors are one line naming the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from qsearch import QSearchError
from qsearch.factory_width import for_data, plan_width, unbound_plan
from qsearch.inventory import first_line
from qsearch.spaces import Family

TORCHVISION = "torchvision:"
FACTORY_ARGS = ("num_classes", "in_channels")
WIDTH_ARG = "width"  # optional: a factory that takes it is searched in width mode
EXAMPLES = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


def resolve_model(name: str) -> Family:
    """The fixed-width family of ``torchvision:NAME``, ``file.py:fn`` or ``module:fn``."""
    if name.startswith(TORCHVISION):
        return torchvision_family(name[len(TORCHVISION):])
    target, _, attr = name.rpartition(":")
    if not target or not attr.isidentifier():
        raise QSearchError(f"model {name!r} not understood: use a registered family, "
                           "torchvision:NAME (e.g. torchvision:resnet18), "
                           "path/to/file.py:function or package.module:function")
    return factory_family(name, target, attr)


def portable_name(name: str) -> str:
    """``file.py:fn`` with the file's absolute path (trials run in other directories: a Ray
    worker's, another node's); any other model name as it is."""
    target, _, attr = name.rpartition(":")
    if name.startswith(TORCHVISION) or not target.endswith(".py"):
        return name
    return f"{Path(target).expanduser().resolve()}:{attr}"


def fixed_plan(width: float, **_) -> dict:
    """A fixed-width model has no channel plan: its channels are its own at every width."""
    return {}


def torchvision_family(arch: str) -> Family:
    from torchvision import models

    known = models.list_models(module=models)
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=4, cutoff=0.6)
        hint = (f"close names: {', '.join(close)}" if close
                else f"e.g. {', '.join(EXAMPLES)}; torchvision.models.list_models() lists all")
        raise QSearchError(f"unknown torchvision model {arch!r} ({hint}): use a torchvision "
                           f"classification builder, e.g. --model torchvision:"
                           f"{(close or EXAMPLES)[0]}")

    def build(plan: dict, *, in_channels: int, num_classes: int):
        model = models.get_model(arch, weights=None, num_classes=num_classes)
        if in_channels != 3:
            replace_stem(model, in_channels)
        return model

    return Family(f"{TORCHVISION}{arch}", fixed_plan, build,
                  f"torchvision {arch}, untrained (fixed width)", 224, fixed_width=True)


def replace_stem(model, in_channels: int) -> None:
    """Swap the first Conv2d, when it reads 3 (RGB) channels, for one of the same shape that
    reads ``in_channels`` (torchvision's builders assume RGB input)."""
    import torch.nn as nn

    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            if conv.in_channels == 3:
                new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                conv.padding_mode, device=conv.weight.device,
                                dtype=conv.weight.dtype)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, new)
            return


def factory_family(name: str, target: str, attr: str) -> Family:
    """The family of a user factory ``fn(*, num_classes, in_channels)``: fixed width, or a
    width family when ``fn`` also takes ``width`` (qsearch then always passes it)."""
    module = _import(name, target, attr)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise QSearchError(f"{target!r} has no callable {attr!r} (model {name!r}): define "
                           f"def {attr}(*, num_classes, in_channels) returning the nn.Module "
                           "there, or name another function")
    takes_width = check_signature(name, attr, fn)

    def build(plan: dict, *, in_channels: int, num_classes: int):
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
        if takes_width:
            kwargs[WIDTH_ARG] = plan_width(name, plan)
        return _call(name, fn, kwargs)

    if not takes_width:
        return Family(name, fixed_plan, build, f"user factory {name} (fixed width)", 0,
                      fixed_width=True)
    family = Family(name, unbound_plan, build, f"user factory {name} (width argument)", 0,
                    user_width=True)
    return dataclasses.replace(family, for_data=functools.partial(for_data, family))


def _call(name: str, fn: Callable, kwargs: dict):
    """The factory's model, or one line naming the call that failed."""
    import torch.nn as nn

    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in kwargs.items())
        raise QSearchError(f"factory {name!r} failed for {args} ({first_line(e)}): fix the "
                           "factory") from None
    if not isinstance(model, nn.Module):
        raise QSearchError(f"factory {name!r} returned a {type(model).__name__}, not a "
                           "torch.nn.Module: return the model")
    return model


def _import(name: str, target: str, attr: str):
    """The factory's module: a ``.py`` file (loaded under a name derived from its absolute
    path, so two files called model.py do not clash) or an importable module."""
    if not target.endswith(".py"):
        try:
            return importlib.import_module(target)
        except Exception as e:  # noqa: BLE001 - importing user code may raise anything
            raise QSearchError(f"module {target!r} of model {name!r} could not be imported "
                               f"({first_line(e)}): install it or put it on PYTHONPATH, or "
                               f"give a file, e.g. path/to/model.py:{attr}") from None
    path = Path(target).resolve()
    if not path.is_file():
        raise QSearchError(f"factory file {target!r} not found (model {name!r}): give an "
                           f"existing file, e.g. path/to/model.py:{attr}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"qsearch_user_model_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - importing user code may raise anything
        del sys.modules[module_name]
        raise QSearchError(f"factory file {target!r} could not be imported ({first_line(e)}): "
                           "fix the file") from None
    return module


def check_signature(name: str, attr: str, fn: Callable) -> bool:
    """The factory must take ``num_classes`` and ``in_channels`` by keyword and need nothing
    else; True when it also takes ``width`` by keyword (with or without a default)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: the call will tell
        return False
    params = list(sig.parameters.values())
    by_keyword = {p.name for p in params
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        missing = [a for a in FACTORY_ARGS if a not in by_keyword]
        if missing:
            raise QSearchError(f"factory {name!r} does not accept {' and '.join(missing)} "
                               f"(its signature is {attr}{sig}): define it as "
                               f"def {attr}(*, num_classes, in_channels) returning the model")
    takes_width = WIDTH_ARG in by_keyword
    passed = (*FACTORY_ARGS, WIDTH_ARG) if takes_width else FACTORY_ARGS
    needed = [p.name for p in params if p.default is p.empty and p.name not in passed
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if needed:
        raise QSearchError(f"factory {name!r} requires {', '.join(needed)}, which qsearch does "
                           f"not pass (its signature is {attr}{sig}): give them defaults")
    return takes_width
