"""Converters: map an upstream checkpoint's state dict onto a zoo model.

Each weights entry of the manifest names its converter. A converter takes the upstream
state dict and the model and returns a state dict in the model's layout; :func:`filter_fn`
wraps it for timm's ``pretrained_filter_fn`` hook and checks the result against the model
before anything is loaded, so a wrong checkpoint fails with the keys that do not fit
instead of a bare ``load_state_dict`` error.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["CONVERTERS", "StateDictMismatchError", "filter_fn", "identity", "torchvision_resnet"]

StateDict = Dict[str, torch.Tensor]

#: Modules whose parameters a torchvision ResNet checkpoint cannot hold (see torchvision_resnet).
_INSERTED_BLOCKS = (".context_block.", ".pre_block.")


class StateDictMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model after conversion."""


def identity(state_dict: StateDict, model: nn.Module) -> StateDict:
    """The checkpoint already has the model's layout."""
    return state_dict


def torchvision_resnet(state_dict: StateDict, model: nn.Module) -> StateDict:
    """torchvision ResNet/ResNeXt -> GC-ResNet (same names, ``conv1``..``layer4``, ``fc``).

    The checkpoint has no GC blocks; their parameters are taken from the model's own
    initialisation, in which each block's last transform conv is zero, so the GC-ResNet
    computes exactly the source ResNet until it is fine-tuned (how every public GC detector
    was started). Every other key must come from the checkpoint.
    """
    out = dict(state_dict)
    for key, value in model.state_dict().items():
        if key not in out and any(part in key for part in _INSERTED_BLOCKS):
            out[key] = value
    return out


CONVERTERS: Dict[str, Callable[[StateDict, nn.Module], StateDict]] = {
    "identity": identity,
    "torchvision_resnet": torchvision_resnet,
}


def _check(converted: StateDict, model: nn.Module, classifier: str, what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    # A classifier of another size is timm's business (num_classes != the weights' classes).
    wrong_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                   for k, v in converted.items()
                   if k in expected and tuple(v.shape) != tuple(expected[k].shape) and not k.startswith(classifier + ".")]
    if missing or unexpected or wrong_shape:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"{what} does not fit the model:"]
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        if wrong_shape:
            lines.append(f"  shape mismatches: {show(wrong_shape)}")
        lines.append("  Check that the checkpoint was made for this architecture (and its gc_ratio/gc_stages), "
                     "or build the model with the arguments the checkpoint was trained with.")
        raise StateDictMismatchError("\n".join(lines))


def filter_fn(arch: str, tag: str, converter: str, source: str) -> Callable[[StateDict, nn.Module], StateDict]:
    """timm ``pretrained_filter_fn`` applying ``converter`` and checking keys and shapes strictly."""
    if converter not in CONVERTERS:
        raise ValueError(f"{arch}.{tag}: unknown converter {converter!r} (known: {', '.join(sorted(CONVERTERS))})")
    convert = CONVERTERS[converter]

    def apply(state_dict: StateDict, model: nn.Module) -> StateDict:
        converted = convert(state_dict, model)
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "fc")
        _check(converted, model, classifier, f"Weights {arch}.{tag} from {source} (converter {converter!r})")
        return converted

    return apply
