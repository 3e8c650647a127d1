"""How the commands (``gczoo demo``, ``gczoo analyze``, ``eval/*.py``) obtain a model's weights.

One rule for all of them:

1. ``--checkpoint FILE``: your own weights, in the zoo's layout (``model.state_dict()`` saved to a
   file) or in the upstream layout of the model's weights tag, told apart by
   :func:`gczoo.convert.is_zoo_layout` and checked key by key (:func:`model_from_file`);
2. ``--weights-file FILE``: a copy of the tag's weights, checked against the manifest's hash first;
3. the tag's (or the default tag's) weights, downloaded and verified;
4. where the model has no weights in the zoo, or they cannot be fetched, commands that *show*
   something (demo, analyze) run on random initialisation seeded with :data:`SEED` and say so,
   with the way to real weights (:func:`carry_advice`); evaluation scripts stop instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from torch import nn

__all__ = ["SEED", "CommandModel", "carry_advice", "model_for_command", "model_from_file"]

#: The seed of random initialisation in the commands, so that two runs show the same output.
SEED = 0


def model_from_file(name: str, path: Path, **kwargs: Any) -> Tuple["nn.Module", str]:
    """``(model, how)``: ``NAME[.TAG]`` with the weights of a local file in the zoo's layout, or else in the
    upstream layout of the tag (the default tag without one) through its converter; keys and shapes checked
    strictly either way (:func:`gczoo.convert.filter_fn`). ``how`` says which layout the file had."""
    from .convert import filter_fn, is_zoo_layout
    from .registry import create_model, model_entry, split_name
    from .trained import build_args_of
    from .weights import load_checkpoint

    kwargs = {**build_args_of(path), **kwargs}  # weights trained by train/*.py: the classes they were trained for
    arch, tag = split_name(name)
    tag = tag or model_entry(arch)["default_tag"]
    state_dict = load_checkpoint(path, f"{arch} checkpoint")
    model = create_model(arch, **kwargs)
    if is_zoo_layout(state_dict, model) or not tag:
        model.load_state_dict(filter_fn(arch, None, "identity", str(path))(state_dict, model))
        return model, "the zoo's layout"
    model = create_model(f"{arch}.{tag}", pretrained=True,
                         pretrained_cfg_overlay=dict(file=str(path), state_dict=state_dict), **kwargs)
    return model, f"converted as {arch}.{tag}"


def carry_advice(name: str, run: str) -> str:
    """What to do where ``name`` (``arch.tag``) cannot be downloaded here; ``run`` is the command line that
    takes the carried file (with ``--weights-file FILE``). Prefix-only sources need the explicit opt-in."""
    from .registry import weights_entry

    _, entry = weights_entry(name)
    full = any(s.get("sha256") for s in entry["sources"])
    prefix = sorted({s["sha256_prefix"] for s in entry["sources"] if s.get("sha256_prefix") and not s.get("sha256")})
    advice = (f"Without network here: on a machine with network, `gczoo download {name} --to DIR` writes the "
              f"upstream file; carry it over and run `{run}`: it is checked against the manifest's hash before use.")
    if prefix and not full:
        advice += (f" The manifest pins only the hash prefix {', '.join(prefix)} of that file's name (32 bits), so "
                   "the file is accepted only with GCZOO_ALLOW_PREFIX_ONLY=1 set.")
    return advice


@dataclass
class CommandModel:
    """A command's model in eval mode and what its weights are (``loaded`` False: random initialisation)."""

    model: "nn.Module"
    loaded: bool
    note: str


def model_for_command(name: str, usage: str, *, checkpoint: Optional[Path] = None,
                      weights_file: Optional[Path] = None, **kwargs: Any) -> CommandModel:
    """The model of ``NAME[.TAG]`` for a command by the module's rule, printing each step on stdout.

    ``usage`` is the command line that takes a carried copy of the weights, ``{name}`` standing for ``arch.tag``
    (e.g. ``"gczoo demo --model {name} --weights-file FILE"``).

    Falls back to random initialisation (seed :data:`SEED`) where the zoo has no weights or they cannot be
    fetched; a file that was asked for (``checkpoint``, ``weights_file``) never falls back: its errors raise.
    """
    import torch

    from . import weights
    from .registry import check_name, create_model, model_entry

    arch, tag = check_name(name)
    if checkpoint is not None and weights_file is not None:
        raise ValueError("--checkpoint (your own weights) and --weights-file (a copy of a tag's) exclude each other")
    if checkpoint is not None:
        model, how = model_from_file(name, checkpoint, **kwargs)
        print(f"== {name}: weights from {checkpoint} ({how})")
        return CommandModel(model.eval(), True, f"weights: {checkpoint.name} ({how})")
    tag = tag or model_entry(arch)["default_tag"]
    reason = "the zoo has no weights for it"
    if tag is not None:
        label = f"{arch}.{tag}"
        if weights_file is not None:
            print(f"== {label}: checking {weights_file} against the manifest")
            print(f"verified: {weights.verify_file(arch, tag, model_entry(arch)['weights'][tag], weights_file)}")
            model = create_model(label, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights_file)), **kwargs)
            return CommandModel(model.eval(), True, f"weights: {label} from {weights_file}")
        print(f"== {label}: downloading and verifying its weights")
        try:
            return CommandModel(create_model(label, pretrained=True, **kwargs).eval(), True, f"weights: {label}")
        except weights.WeightsUnavailableError as err:
            print(f"{err.summary()}\n{carry_advice(label, usage.format(name=label))}")
            reason = f"its weights {label} could not be fetched"
    elif weights_file is not None:
        raise ValueError(f"{arch} has no weights in the zoo, so --weights-file cannot be checked against it; "
                         "pass your own weights with --checkpoint FILE")
    note = (f"random weights (seed {SEED}), as {reason}: the output means nothing; pass your own weights with "
            "--checkpoint FILE")
    print(f"== {arch}: {note}")
    torch.manual_seed(SEED)  # the tag's architecture (e.g. its number of classes), without its weights
    return CommandModel(create_model(f"{arch}.{tag}" if tag else arch, **kwargs).eval(), False, note)
