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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, model_entrypoint
from timm.models._features import feature_take_indices
from timm.models.resnet import drop_blocks
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


_FIXED_AFFINE_FORWARDS = {FrozenBatchNorm2d.forward}


def fixed_affine_norm(cls: type) -> type:
    """Class decorator: ``cls.forward`` computes torchvision's ``FrozenBatchNorm2d`` map from the
    same ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``eps`` (in any mode), so
    :func:`frozen_affine` may fold it."""
    _FIXED_AFFINE_FORWARDS.add(cls.forward)
    return cls


def frozen_affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` when ``norm`` is a fixed per-channel affine map ``x * scale + shift``, else ``None``.

    That holds for torchvision's ``FrozenBatchNorm2d`` and for an ``nn.BatchNorm2d`` in eval
    mode with running statistics (``y = (x - mean) / sqrt(var + eps) * weight + bias``). The
    check is structural: any module whose ``forward`` is one of these two, or was declared to
    compute the frozen map by :func:`fixed_affine_norm` (the detection models'
    ``FrozenParamBatchNorm2d``), computes it from its ``weight``, ``bias``, running statistics
    and ``eps``; a subclass with its own ``forward`` (e.g. BatchNorm + activation) or another
    norm layer is not trusted to.
    """
    forward = type(norm).forward
    if forward is nn.modules.batchnorm._BatchNorm.forward and isinstance(norm, nn.BatchNorm2d):
        if norm.training or norm.running_var is None:
            return None
    elif forward not in _FIXED_AFFINE_FORWARDS:
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
    """torchvision's bottleneck (stride on the 3x3 conv) with optional extras.

    ``context_block`` runs on the output of ``bn3`` before the residual addition (GCNet's
    "after conv3" placement); ``pre_block`` runs on the block's input (used by the ablation
    rows that insert one block between residual blocks). ``drop_block`` (after ``bn2``) and
    ``drop_path`` (on the residual branch) are timm's regularisers, placed as in timm's ResNet.

    With a :class:`~gczoo.blocks.ContextBlock` in eval mode and ``bn3`` a BatchNorm with
    running statistics (or a ``FrozenBatchNorm2d``), ``bn3(conv3(h))`` is a per-position
    affine map of ``h``: the block then computes its context from ``h``, which has 4x fewer
    channels, or from ``conv3(h)`` before bn3 when that reads less memory
    (:meth:`~gczoo.blocks.ContextBlock.context_of_affine`). The result equals running bn3 and
    the GC block one after the other; training mode and other norm layers take that plain route,
    and so do TorchScript and torch.fx symbolic tracing, whose graphs then hold plain modules.

    ``dilation`` dilates the 3x3 conv (padding = dilation), as in dilated ResNets for
    segmentation (:mod:`gczoo.models.segmentation`).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, context_block: Optional[nn.Module] = None,
                 pre_block: Optional[nn.Module] = None, norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 conv2_layer: Callable[..., nn.Module] = nn.Conv2d,
                 drop_block: Optional[nn.Module] = None, drop_path: Optional[nn.Module] = None, dilation: int = 1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        outplanes = planes * self.expansion
        self.pre_block = pre_block
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv2_layer(width, width, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups,
                                 bias=False)
        self.bn2 = norm_layer(width)
        self.drop_block = drop_block
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.context_block = context_block
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    @torch.jit.unused
    def _folded_bn3(self, h: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """bn3 as ``(scale, shift)`` when the eval-mode route applies to input ``h``, else ``None``.

        Not under torch.fx symbolic tracing (``h`` a Proxy): its size test and the fold are
        Python-side decisions a graph cannot hold. TorchScript never calls it.
        """
        if self.training or not isinstance(self.context_block, ContextBlock) or isinstance(h, torch.fx.Proxy):
            return None
        return frozen_affine(self.bn3)

    @torch.jit.unused
    def _bn3_and_context(self, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``gc(bn3(conv3(h)))`` with the context taken through bn3 folded to ``(scale, shift)`` (eval mode only).

        bn3 itself still produces the main path, so a GC block whose transform is zero leaves
        the bottleneck's output bit for bit as without it (a GC-ready checkpoint gives exactly
        its source ResNet's logits); only the context, which reaches the output through the
        transform, is computed by the fold. (In eval mode drop_path is the identity.)
        """
        gc = self.context_block
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
        out = self.bn2(self.conv2(out))
        if self.drop_block is not None:
            out = self.drop_block(out)
        out = self.relu(out)
        affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        if not torch.jit.is_scripting():
            affine = self._folded_bn3(out)
        if affine is not None:
            out = self._bn3_and_context(out, affine[0], affine[1])
        else:
            out = self.bn3(self.conv3(out))
            if self.context_block is not None:
                out = self.context_block(out)
            if self.drop_path is not None:
                out = self.drop_path(out)
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
        drop_path_rate: stochastic depth, rising linearly from 0 at the first bottleneck to this
            rate at the last (timm's ResNet rule).
        drop_block_rate: DropBlock in c4 and c5 (timm's ResNet: block sizes 5 and 3).
        zero_init_last: start each bottleneck's ``bn3`` scale at zero, as timm's ResNet (default
            True); pretrained weights replace it.
        stem_feature: list the stem's output (``relu``, stride 2) as ``feature_info[0]`` before
            c2..c5, as timm's ResNet does; models built by timm (``timm.create_model``,
            :func:`gczoo.create_model`) have it, and ``features_only=True`` still gives c2..c5
            unless ``out_indices`` says otherwise. Off by default for bodies whose every
            ``feature_info`` entry feeds an FPN (the detection builder).
    """

    #: Modules that depend on the classes (:mod:`gczoo.finetune`): timm's classifier, initialised as
    #: timm's ResNet leaves it (``nn.Linear``'s default); timm drops it from a checkpoint of other classes.
    class_layers = ("fc",)

    def __init__(self, layers: Sequence[int], groups: int = 1, base_width: int = 64, num_classes: int = 1000,
                 in_chans: int = 3, global_pool: str = "avg", drop_rate: float = 0.0,
                 gc_stages: Union[None, str, Sequence] = (3, 4, 5), gc_ratio: float = 1 / 16,
                 gc_pooling: str = "att", gc_fusion: Union[str, Sequence[str]] = "add",
                 stage_blocks: Optional[Dict[Union[int, str], str]] = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 conv2_layer: Callable[..., nn.Module] = nn.Conv2d, conv2_stages: Union[None, str, Sequence] = (),
                 drop_path_rate: float = 0.0, drop_block_rate: float = 0.0, stem_feature: bool = False,
                 zero_init_last: bool = True):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers!r}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
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
        self.stem_feature = stem_feature
        self.feature_info: List[dict] = [dict(num_chs=64, reduction=2, module="relu")] if stem_feature else []
        inplanes = 64
        total_blocks, block_index = sum(layers), 0
        for i, (depth, planes, drop_block) in enumerate(zip(layers, (64, 128, 256, 512), drop_blocks(drop_block_rate))):
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
                drop_prob = drop_path_rate * block_index / max(total_blocks - 1, 1)
                blocks.append(Bottleneck(inplanes, planes, stride if j == 0 else 1, downsample, groups, base_width,
                                         context_block=gc, pre_block=pre, norm_layer=norm_layer,
                                         conv2_layer=conv2_layer if stage in conv2_stages else nn.Conv2d,
                                         drop_block=drop_block() if drop_block is not None else None,
                                         drop_path=DropPath(drop_prob) if drop_prob > 0 else None))
                inplanes = outplanes
                block_index += 1
            name = STAGE_NAMES[stage]
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=outplanes, reduction=2 ** stage, module=name))
        self.num_features = inplanes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        """timm's ResNet init: He normal (fan_out) convs, BatchNorm 1 / 0, and with ``zero_init_last``
        each bottleneck's last BatchNorm scale at 0 (Goyal et al. 2017), so every residual branch
        starts as the identity. Inserted blocks keep their own (identity) initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, tuple(_STAGE_BLOCKS.values())):
                m.reset_parameters()
            elif zero_init_last and isinstance(m, Bottleneck) and getattr(m.bn3, "weight", None) is not None:
                nn.init.zeros_(m.bn3.weight)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, str]:
        """Parameter groups for timm's layer-wise LR decay: the stem, then each bottleneck (each stage if ``coarse``)."""
        return dict(stem=r"^conv1|^bn1|^maxpool", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck in the backward pass instead of storing its activations (timm's ``checkpoint_seq``)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new ``num_classes`` head (0: none); ``global_pool`` ``None`` keeps the current pooling, ``""`` removes it."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        device = self.conv1.weight.device
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.global_pool.to(device).train(self.training)
        self.fc.to(device).train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The final features and the intermediates at ``indices`` of ``feature_info`` (timm's interface).

        With ``stem_feature`` index 0 is the stem (stride 2) and 1..4 are c2..c5, as in timm's
        ResNet; without, 0..3 are c2..c5. ``indices``: an int takes the last n, a sequence those
        indices, ``None`` all. ``norm`` has no effect (no final norm); ``stop_early`` runs only
        the stages needed; only NCHW output.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"GCResNet intermediates are NCHW only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        first_stage = int(self.stem_feature)  # feature_info index of c2
        intermediates = []
        x = self.relu(self.bn1(self.conv1(x)))
        if self.stem_feature and 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        if stop_early:
            stages = stages[:max_index + 1 - first_stage]
        for index, stage in enumerate(stages, start=first_stage):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if index in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        kept_stages = max_index + 1 - int(self.stem_feature)
        for name in ("layer1", "layer2", "layer3", "layer4")[kept_stages:]:
            setattr(self, name, nn.Sequential())  # empty Sequential: still iterable by checkpoint_seq
        if kept_stages == 0:
            self.maxpool = nn.Identity()
        if max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            prune_head = True
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build(variant: str, pretrained: bool = False, **kwargs) -> GCResNet:
    """Build through timm's ``build_model_with_cfg`` (pretrained cfg, features_only, pretrained loading).

    ``feature_info`` lists the stem and c2..c5, as timm's ResNet; ``features_only=True`` gives
    c2..c5 (strides 4, 8, 16, 32) by default; ``out_indices`` index ``feature_info`` (0: the stem).
    """
    kwargs.setdefault("stem_feature", True)
    out_indices = (1, 2, 3, 4) if kwargs["stem_feature"] else (0, 1, 2, 3)
    return build_model_with_cfg(GCResNet, variant, pretrained, feature_cfg=dict(out_indices=out_indices), **kwargs)


#: timm pretrained cfgs of every gc_resnet architecture, generated from the manifest.
default_cfgs = registry.default_cfgs("gc_resnet", first_conv="conv1", classifier="fc", feature_stride=32)
registry.register_timm_models(__name__, "gc_resnet")
# timm's register_model lists each entrypoint in this module's __all__ (as for its own model
# modules); bind them here too, so that star-imports and ``gc_resnet.<arch>(...)`` work.
globals().update({name: model_entrypoint(name) for name in __all__ if name not in globals()})
