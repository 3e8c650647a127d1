"""GC-ResNet and GC-ResNeXt (GCNet, Cao et al.), with the paper's ImageNet ablation rows.

The ResNet part keeps torchvision's layout and state-dict names (``conv1``, ``bn1``,
``layer1``..``layer4``, ``fc``; stride on the 3x3 conv, "ResNet v1.5"), so torchvision and
mmdetection backbone weights load as they are. A GC block sits in every bottleneck of the
chosen stages after ``conv3``/``bn3`` and before the residual addition, as
``layerN.i.context_block`` -- the place and the name used by GCNet's public checkpoints.

The ablation rows of the paper's ImageNet table put one block (GC, NL or simplified NL)
before the last residual block of c4; it lives at ``layer3.<last>.pre_block``.

Architectures and their pretrained cfgs come from ``weights_manifest.json`` through
:mod:`gczoo.registry`, which registers them with timm at import.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from timm.layers import create_classifier
from timm.models import build_model_with_cfg
from torchvision.ops import FrozenBatchNorm2d

from .. import registry
from ..blocks import ContextBlock, NonLocalBlock, SimplifiedNonLocalBlock, fuse

__all__ = ["GCResNet", "Bottleneck", "build", "parse_stages", "STAGE_NAMES"]

#: c2..c5 are the outputs of layer1..layer4 (strides 4, 8, 16, 32).
STAGE_NAMES = {2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}


def parse_stages(stages: Union[None, str, int, Sequence[Union[int, str]]]) -> tuple:
    """Turn ``"c3-c5"``, ``"c4"``, ``[3, 4, 5]`` or ``["c3", "c4"]`` into a sorted tuple of ints in 2..5."""
    if stages is None:
        return ()
    if isinstance(stages, str) and "-" in stages:
        lo, hi = (parse_stages(s)[0] for s in stages.split("-"))
        stages = range(lo, hi + 1)
    elif isinstance(stages, (str, int)):
        stages = [stages]
    out = set()
    for s in stages:
        value = int(s[1:]) if isinstance(s, str) and s[:1].lower() == "c" else s
        try:
            value = int(value)
        except (TypeError, ValueError):
            value = None
        if value not in STAGE_NAMES:
            raise ValueError(f"stages are c2..c5 (or 2..5), got {s!r}")
        out.add(value)
    return tuple(sorted(out))


def frozen_affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` when ``norm`` is a fixed per-channel affine map ``x * scale + shift``, else ``None``.

    That holds for torchvision's ``FrozenBatchNorm2d`` and for an ``nn.BatchNorm2d`` in eval
    mode with running statistics (``y = (x - mean) / sqrt(var + eps) * weight + bias``).
    Subclasses and other norm layers are not trusted to compute the same map.
    """
    if type(norm) is nn.BatchNorm2d:
        if norm.training or norm.running_var is None:
            return None
    elif type(norm) is not FrozenBatchNorm2d:
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    if norm.bias is None:
        return scale, -norm.running_mean * scale
    return scale, torch.addcmul(norm.bias, norm.running_mean, scale, value=-1)


def _known_true(cond) -> bool:
    """``cond`` for concrete sizes; for symbolic sizes (torch.compile / torch.export with dynamic
    shapes) True only if it holds for every value, without adding a guard. Under torch.jit /
    TorchScript-based ONNX tracing sizes are traced tensors and the traced value is used."""
    if isinstance(cond, torch.Tensor):
        return bool(cond)
    return statically_known_true(cond)


class Bottleneck(nn.Module):
    """torchvision's bottleneck (stride on the 3x3 conv) with two optional extras.

    ``context_block`` runs on the output of ``bn3`` before the residual addition (GCNet's
    "after conv3" placement); ``pre_block`` runs on the block's input (used by the ablation
    rows that insert one block between residual blocks).

    With a :class:`~gczoo.blocks.ContextBlock` in eval mode and ``bn3`` a BatchNorm with
    running statistics (or a ``FrozenBatchNorm2d``), ``bn3(conv3(h))`` is a per-position
    affine map of ``h``: the block then computes its context from ``h``, which has 4x fewer
    channels, or from ``conv3(h)`` before bn3 when that reads less memory
    (:meth:`~gczoo.blocks.ContextBlock.context_of_affine`). The result equals running bn3 and
    the GC block one after the other; training mode and other norm layers take that plain route.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, context_block: Optional[nn.Module] = None,
                 pre_block: Optional[nn.Module] = None, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 conv2_layer: Callable[..., nn.Module] = nn.Conv2d):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        outplanes = planes * self.expansion
        self.pre_block = pre_block
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv2_layer(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.context_block = context_block
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _bn3_and_context(self, h: torch.Tensor, gc: ContextBlock, scale: torch.Tensor,
                         shift: torch.Tensor) -> torch.Tensor:
        """``gc(bn3(conv3(h)))`` with the context taken through bn3 folded to ``(scale, shift)`` (eval mode only).

        bn3 itself still produces the main path, so a GC block whose transform is zero leaves
        the bottleneck's output bit for bit as without it (a GC-ready checkpoint gives exactly
        its source ResNet's logits); only the context, which reaches the output through the
        transform, is computed by the fold.
        """
        weight = self.conv3.weight.flatten(1)
        out_ch, in_ch = weight.shape
        positions = h.shape[0] * h.shape[2] * h.shape[3]  # sizes, not numel(): ints under jit tracing too
        # Pooling reads its input twice; through conv3 it also reads conv3's weight twice.
        # Take the cheaper one: h in c3/c4, y where maps are small and weights large (c5).
        # From h, the context comes first, so conv3 then finds h and its weight in cache.
        # For a symbolic (dynamic) batch, _known_true adds no guard: y unless h is cheaper
        # for every batch size.
        if _known_true(positions * in_ch + out_ch * in_ch < positions * out_ch):
            context = gc.context_of_affine(h, scale, shift, weight)
            y = self.conv3(h)
        else:
            y = self.conv3(h)
            context = gc.context_of_affine(y, scale, shift)
        # bn3's output is fresh and needed by nothing else: "add" fusion goes into it in place
        return fuse(self.bn3(y), *gc.fusion_terms(context), inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_block is not None:
            x = self.pre_block(x)
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        gc = self.context_block
        affine = frozen_affine(self.bn3) if isinstance(gc, ContextBlock) and not self.training else None
        if affine is not None:
            out = self._bn3_and_context(out, gc, *affine)
        else:
            out = self.bn3(self.conv3(out))
            if gc is not None:
                out = gc(out)
        out += shortcut
        return self.relu(out)


#: Blocks that ``stage_blocks`` can insert between residual blocks.
_STAGE_BLOCKS = {"gc": ContextBlock, "nl": NonLocalBlock, "snl": SimplifiedNonLocalBlock}


class GCResNet(nn.Module):
    """ResNet/ResNeXt with GC blocks (GCNet section 4.2), following timm's model interface.

    Args:
        layers: bottlenecks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        groups, base_width: ResNeXt cardinality and width per group (``32, 4`` for 32x4d).
        gc_stages: stages c2..c5 whose every bottleneck carries a GC block (default c3-c5).
        gc_ratio, gc_pooling, gc_fusion: see :class:`gczoo.blocks.ContextBlock`.
        stage_blocks: ``{stage: "gc" | "nl" | "snl"}``; one such block is placed before the
            last residual block of that stage (the paper's single-block ablations).
        norm_layer: normalisation of the ResNet part (``nn.BatchNorm2d``; detection backbones
            pass torchvision's ``FrozenBatchNorm2d``).
        conv2_layer, conv2_stages: the 3x3 conv of every bottleneck in ``conv2_stages`` is built
            by ``conv2_layer`` (``nn.Conv2d``'s signature), e.g. a deformable conv in c3-c5.
        num_classes, in_chans, global_pool, drop_rate: as in timm.
    """

    def __init__(self, layers: Sequence[int], groups: int = 1, base_width: int = 64, num_classes: int = 1000,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 gc_stages: Union[None, str, Sequence] = (3, 4, 5), gc_ratio: float = 1 / 16,
                 gc_pooling: str = "att", gc_fusion: Union[str, Sequence[str]] = "add",
                 stage_blocks: Optional[Dict[Union[int, str], str]] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 conv2_layer: Callable[..., nn.Module] = nn.Conv2d, conv2_stages: Union[None, str, Sequence] = ()):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.gc_stages = parse_stages(gc_stages)
        conv2_stages = parse_stages(conv2_stages)
        gc_kw = dict(ratio=gc_ratio, pooling=gc_pooling, fusion=gc_fusion)
        extra = {}
        for stage, kind in (stage_blocks or {}).items():
            if kind not in _STAGE_BLOCKS:
                raise ValueError(f"stage_blocks kinds are {sorted(_STAGE_BLOCKS)}, got {kind!r}")
            extra[parse_stages(stage)[0]] = kind

        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info: List[dict] = []
        inplanes = 64
        for i, (depth, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stage = i + 2
            stride = 1 if stage == 2 else 2
            outplanes = planes * Bottleneck.expansion
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != outplanes):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), norm_layer(outplanes))
                gc = ContextBlock(outplanes, **gc_kw) if stage in self.gc_stages else None
                pre = None
                if stage in extra and j == depth - 1:
                    kind = extra[stage]
                    pre = ContextBlock(inplanes, **gc_kw) if kind == "gc" else _STAGE_BLOCKS[kind](inplanes)
                blocks.append(Bottleneck(inplanes, planes, stride if j == 0 else 1, downsample, groups, base_width,
                                         context_block=gc, pre_block=pre, norm_layer=norm_layer,
                                         conv2_layer=conv2_layer if stage in conv2_stages else nn.Conv2d))
                inplanes = outplanes
            name = STAGE_NAMES[stage]
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=outplanes, reduction=2 ** stage, module=name))
        self.num_features = self.head_hidden_size = inplanes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Context blocks keep their own initialisation, which makes each new block the identity.
        for m in self.modules():
            if isinstance(m, tuple(_STAGE_BLOCKS.values())):
                m.reset_parameters()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build(variant: str, pretrained: bool = False, **kwargs) -> GCResNet:
    """Build through timm's ``build_model_with_cfg`` (pretrained cfg, features_only, pretrained loading).

    ``features_only=True`` gives c2..c5 (strides 4, 8, 16, 32) by default.
    """
    return build_model_with_cfg(GCResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


#: timm pretrained cfgs of every gc_resnet architecture, generated from the manifest.
default_cfgs = registry.default_cfgs("gc_resnet", first_conv="conv1", classifier="fc")
registry.register_timm_models(__name__, "gc_resnet")
