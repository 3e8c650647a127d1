"""mmsegmentation GCNet / NLNet checkpoints, written for tests in mmsegmentation's exact layout.

Key names and shapes follow mmsegmentation 1.2.2's modules (``ResNetV1c`` deep stem
``backbone.stem.{0,1,3,4,6,7}``, ``layerN.i.{conv,bn}{1,2,3}``, ``downsample.{0,1}``;
``GCHead`` / ``NLHead`` with mmcv ``ConvModule``s ``convs.{0,1}``, ``conv_cat``, ``gc_block`` /
``nl_block``, ``conv_seg``; ``FCNHead`` as ``auxiliary_head``), written out here independently of
gczoo's converter; mmsegmentation itself loads these files strictly (the golden logits in
``tests/data/segmentation/`` were made that way by ``make_golden.py`` there).

Values come from torch's CPU generator seeded per key (crc32 of the key and the seed), so the
same file is written on every platform, and are conditioned so that logits stay bounded and vary over
the image: He-uniform convs, BatchNorm with non-trivial statistics, the last BN of each residual
branch damped, GC / NL blocks with non-zero transforms, classifiers centred over channels.
"""
from __future__ import annotations

import functools
import math
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Tuple

import torch

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def mmseg_shapes(head: str, depth: int, num_classes: int) -> "OrderedDict[str, Tuple[int, ...]]":
    """``{key: shape}`` of an mmsegmentation GCNet (``head="gc"``) / NLNet (``"nl"``) R-D8 model."""
    shapes: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()

    def conv(name, out_c, in_c, k, bias=False):
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)
        if bias:
            shapes[f"{name}.bias"] = (out_c,)

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    for i, (o, c) in enumerate(((32, 3), (32, 32), (64, 32))):
        conv(f"backbone.stem.{3 * i}", o, c, 3)
        bn(f"backbone.stem.{3 * i + 1}", o)
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(DEPTHS[depth], (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            conv(f"{p}.conv1", planes, inplanes, 1); bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3); bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1); bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1); bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    conv("decode_head.conv_seg", num_classes, 512, 1, bias=True)
    conv("decode_head.convs.0.conv", 512, 2048, 3); bn("decode_head.convs.0.bn", 512)
    conv("decode_head.convs.1.conv", 512, 512, 3); bn("decode_head.convs.1.bn", 512)
    conv("decode_head.conv_cat.conv", 512, 2560, 3); bn("decode_head.conv_cat.bn", 512)
    if head == "gc":
        conv("decode_head.gc_block.conv_mask", 1, 512, 1, bias=True)
        conv("decode_head.gc_block.channel_add_conv.0", 128, 512, 1, bias=True)
        shapes["decode_head.gc_block.channel_add_conv.1.weight"] = (128, 1, 1)
        shapes["decode_head.gc_block.channel_add_conv.1.bias"] = (128, 1, 1)
        conv("decode_head.gc_block.channel_add_conv.3", 512, 128, 1, bias=True)
    else:
        conv("decode_head.nl_block.g.conv", 256, 512, 1, bias=True)
        conv("decode_head.nl_block.conv_out.conv", 512, 256, 1); bn("decode_head.nl_block.conv_out.bn", 512)
        conv("decode_head.nl_block.theta.conv", 256, 512, 1, bias=True)
        conv("decode_head.nl_block.phi.conv", 256, 512, 1, bias=True)
    conv("auxiliary_head.conv_seg", num_classes, 256, 1, bias=True)
    conv("auxiliary_head.convs.0.conv", 256, 1024, 3); bn("auxiliary_head.convs.0.bn", 256)
    return shapes


def _uniform(key: str, shape: Tuple[int, ...], seed: int) -> torch.Tensor:
    """Values in [-1, 1) from torch's CPU generator seeded by (key, seed)."""
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()) + 7919 * seed)
    return torch.rand(shape, generator=gen) * 2 - 1


def mmseg_state_dict(head: str = "gc", depth: int = 50, num_classes: int = 19, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A well-conditioned state dict with mmsegmentation's keys and shapes."""
    state: Dict[str, torch.Tensor] = OrderedDict()
    for key, shape in mmseg_shapes(head, depth, num_classes).items():
        u = _uniform(key, shape, seed)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = 1.0 + 0.2 * u
        elif key.endswith("running_mean"):
            state[key] = 0.1 * u
        elif len(shape) == 4:  # conv: He-uniform
            state[key] = u * math.sqrt(6.0 / math.prod(shape[1:]))
        elif key.endswith("weight"):  # BN / LayerNorm scale
            state[key] = (1 + 0.1 * u) * (0.2 if key.endswith(".bn3.weight") else 1.0)
        else:  # biases
            state[key] = 0.05 * u
    for h in ("decode_head", "auxiliary_head"):  # centred classifiers: the argmax varies over the image
        w = state[f"{h}.conv_seg.weight"]
        w -= w.mean(1, keepdim=True)
    for key in ("decode_head.convs.0.conv.weight", "decode_head.convs.1.conv.weight", "decode_head.conv_cat.conv.weight"):
        w = state[key]  # 3x3 taps without their mean: the head responds to texture, not offsets
        w -= w.mean((2, 3), keepdim=True)
    if head == "gc":  # small LayerNorm input: its eps shows in the logits
        state["decode_head.gc_block.channel_add_conv.0.weight"] *= 0.02
        state["decode_head.gc_block.channel_add_conv.0.bias"] *= 0.02
    return state


@functools.lru_cache(maxsize=2)
def _made_once(head: str, depth: int, num_classes: int, seed: int):
    state = mmseg_state_dict(head, depth, num_classes, seed)
    return state, {key: value._version for key, value in state.items()}


def shared_state_dict(head: str = "gc", depth: int = 50, num_classes: int = 19, seed: int = 0) -> Dict[str, torch.Tensor]:
    """:func:`mmseg_state_dict` made once for the test session (the two asked for last are kept; making
    one costs seconds): a new dict on every call, sharing the tensors. Callers may add or remove keys
    but must not change a tensor in place; one that did is named here, at the next call."""
    state, versions = _made_once(head, depth, num_classes, seed)
    changed = [key for key, value in state.items() if value._version != versions[key]]
    if changed:
        raise AssertionError(f"a test changed shared mmseg tensors in place: {', '.join(changed[:5])}")
    return dict(state)


def write_checkpoint(path: Path, state_dict: Dict[str, torch.Tensor]) -> Path:
    """Save like mmsegmentation's model zoo: ``{"state_dict": ..., "meta": {...plain values...}}``."""
    torch.save({"state_dict": state_dict, "meta": {"mmseg_version": "0.5.0", "iter": 40000}}, path)
    return path
