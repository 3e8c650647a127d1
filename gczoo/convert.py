"""Converters: map an upstream checkpoint's state dict onto a zoo model.

Each weights entry of the manifest names its converter. A converter takes the upstream
state dict and the model and returns a state dict in the model's layout; :func:`filter_fn`
wraps it for timm's ``pretrained_filter_fn`` hook and checks the result against the model
before anything is loaded, so a wrong checkpoint fails with the keys that do not fit
instead of a bare ``load_state_dict`` error.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Optional

import torch
from torch import nn

from . import finetune
from .weights import WeightsError, load_checkpoint

__all__ = ["CONVERTERS", "HEADLESS", "StateDictMismatchError", "filter_fn", "identity", "is_zoo_layout", "load_pretrained",
           "mmdet_backbone", "mmdet_maskrcnn", "mmseg_segmentor", "new_head", "torchvision_resnet"]

StateDict = Dict[str, torch.Tensor]

#: Modules whose parameters a torchvision ResNet checkpoint cannot hold (see torchvision_resnet).
_INSERTED_BLOCKS = (".context_block.", ".pre_block.")


class StateDictMismatchError(WeightsError):
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


#: mmdetection 2.x (Cascade) Mask R-CNN key prefixes -> :mod:`gczoo.models.detection` (torchvision) prefixes.
_MMDET_RENAMES = (
    (r"backbone\.(layer\d\.\d+)\.conv2_offset\.", r"backbone.body.\1.conv2.conv_offset."),  # DCN, mmdet < 2.x naming
    (r"backbone\.", "backbone.body."),
    (r"neck\.lateral_convs\.(\d+)\.conv\.", r"backbone.fpn.inner_blocks.\1.0."),
    (r"neck\.fpn_convs\.(\d+)\.conv\.", r"backbone.fpn.layer_blocks.\1.0."),
    (r"rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"roi_head\.bbox_head\.fc_cls\.", "roi_heads.box_predictor.cls_score."),
    (r"roi_head\.bbox_head\.fc_reg\.", "roi_heads.box_predictor.bbox_pred."),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"roi_head\.mask_head\.conv_logits\.", "roi_heads.mask_predictor.mask_fcn_logits."),
    # Cascade: one box head and one mask head per stage (class-agnostic box regression, 4 outputs)
    (r"roi_head\.bbox_head\.(\d)\.shared_fcs\.0\.", r"roi_heads.stages.\1.box_head.fc6."),
    (r"roi_head\.bbox_head\.(\d)\.shared_fcs\.1\.", r"roi_heads.stages.\1.box_head.fc7."),
    (r"roi_head\.bbox_head\.(\d)\.fc_cls\.", r"roi_heads.stages.\1.box_predictor.cls_score."),
    (r"roi_head\.bbox_head\.(\d)\.fc_reg\.", r"roi_heads.stages.\1.box_predictor.bbox_pred."),
    (r"roi_head\.mask_head\.(\d)\.convs\.(\d+)\.conv\.", r"roi_heads.stages.\1.mask_head.\2.0."),
    (r"roi_head\.mask_head\.(\d)\.upsample\.", r"roi_heads.stages.\1.mask_predictor.conv5_mask."),
    (r"roi_head\.mask_head\.(\d)\.conv_logits\.", r"roi_heads.stages.\1.mask_predictor.mask_fcn_logits."),
)
_CLASSIFIER = re.compile(r"roi_heads\.(stages\.\d\.)?box_predictor\.cls_score\.")
_MASK_LOGITS = re.compile(r"roi_heads\.(stages\.\d\.)?mask_predictor\.mask_fcn_logits\.")


def _with_background_slot(tensor: torch.Tensor, per_class: int) -> torch.Tensor:
    """Prepend a zero slot of ``per_class`` rows: torchvision's heads have one for class 0 (background)."""
    return torch.cat([tensor.new_zeros((per_class, *tensor.shape[1:])), tensor])


def _rename(key: str, renames) -> str:
    """``key`` with the first ``(pattern, replacement)`` of ``renames`` that matches its start applied."""
    for pattern, replacement in renames:
        new, hits = re.subn("^" + pattern, replacement, key)
        if hits:
            return new
    return key


def mmdet_maskrcnn(state_dict: StateDict, model: nn.Module) -> StateDict:
    """mmdetection 2.x (Cascade) Mask R-CNN + FPN -> :mod:`gczoo.models.detection`'s models.

    * ``backbone.*`` (torchvision ResNet names, GC blocks at ``layerN.i.context_block``) moves
      under ``backbone.body``; BatchNorm's ``num_batches_tracked`` counters are dropped, since
      frozen BatchNorm has none. ``neck``, ``rpn_head``, ``roi_head`` are renamed one to one.
    * Classifier: mmdetection's 81 outputs are the 80 classes then background (index 80);
      torchvision's put background first, so the last row moves to the front. Softmax
      probabilities are the same, reordered.
    * Box regression (``80 * 4`` outputs) and mask logits (80 outputs) have no background slot;
      a zero slot is prepended. torchvision never reads it at inference (it drops class 0
      before decoding results and picks masks by the predicted, foreground, label).
    * Cascade files (``roi_head.{bbox,mask}_head.{0,1,2}``) go to ``roi_heads.stages.{0,1,2}``
      with the same changes, except that their class-agnostic box regression (4 outputs) is
      kept as it is. DCN offset convs (``conv2.conv_offset``, or ``conv2_offset`` in older
      files) go to ``conv2.conv_offset`` of :class:`gczoo.models.mmdet_ops.DeformConv2dPack`.

    A key matching none of these names is passed through unchanged, so the strict check of
    :func:`filter_fn` reports it as unexpected.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("backbone.") and key.endswith(".num_batches_tracked"):
            continue
        new = _rename(key, _MMDET_RENAMES)
        if _CLASSIFIER.match(new):
            value = torch.cat([value[-1:], value[:-1]])
        elif new.startswith("roi_heads.box_predictor.bbox_pred."):
            value = _with_background_slot(value, 4)
        elif _MASK_LOGITS.match(new):
            value = _with_background_slot(value, 1)
        out[new] = value
    return out


def new_head(state_dict: StateDict, model: nn.Module) -> StateDict:
    """A checkpoint in the model's layout without a classifier (a backbone): the head stays as initialised.

    Every key but the classifier's (timm's ``pretrained_cfg["classifier"]``, ``fc``) must come
    from the checkpoint. :mod:`gczoo.registry` warns once when such a model keeps a head.
    """
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "fc") + "."
    head = {k: v for k, v in model.state_dict().items() if k.startswith(classifier) and k not in state_dict}
    return {**state_dict, **head}


def mmdet_backbone(state_dict: StateDict, model: nn.Module) -> StateDict:
    """The backbone of an mmdetection 2.x detector -> the GC-ResNet classifier (:func:`new_head` for the rest).

    mmdetection's ``backbone.*`` keys are torchvision's ResNet names with GC blocks at
    ``layerN.i.context_block`` (the zoo's own layout), so the prefix is dropped and every
    other key (neck, heads) left out. BatchNorm statistics and affine parameters are taken as
    the detector has them (it applies them frozen at inference; see the tag's ``training`` for
    whether they were updated on COCO). ``num_batches_tracked`` counters are kept when the
    model has them.
    """
    expected = model.state_dict()
    backbone = {key[len("backbone."):]: value for key, value in state_dict.items() if key.startswith("backbone.")}
    backbone = {k: v for k, v in backbone.items() if not k.endswith(".num_batches_tracked") or k in expected}
    return new_head(backbone, model)


#: mmsegmentation ``EncoderDecoder`` (GCHead / NLHead + FCNHead) key prefixes -> :mod:`gczoo.models.segmentation`.
_MMSEG_RENAMES = (
    (r"backbone\.", "backbone."),  # ResNetV1c: stem.{0,1,3,4,6,7}, layerN.i.{conv,bn}{1,2,3}, downsample.{0,1}
    (r"decode_head\.(convs\.\d+|conv_cat)\.conv\.", r"classifier.\1.0."),
    (r"decode_head\.(convs\.\d+|conv_cat)\.bn\.", r"classifier.\1.1."),
    (r"decode_head\.gc_block\.", "classifier.context_block."),
    (r"decode_head\.nl_block\.(g|theta|phi)\.conv\.", r"classifier.nonlocal_block.\1."),
    (r"decode_head\.nl_block\.conv_out\.conv\.", "classifier.nonlocal_block.out_conv."),
    (r"decode_head\.nl_block\.conv_out\.bn\.", "classifier.nonlocal_block.out_bn."),
    (r"decode_head\.conv_seg\.", "classifier.conv_seg."),
    (r"auxiliary_head\.convs\.(\d+)\.conv\.", r"aux_classifier.convs.\1.0."),
    (r"auxiliary_head\.convs\.(\d+)\.bn\.", r"aux_classifier.convs.\1.1."),
    (r"auxiliary_head\.conv_seg\.", "aux_classifier.conv_seg."),
)


def mmseg_segmentor(state_dict: StateDict, model: nn.Module) -> StateDict:
    """mmsegmentation GCNet / NLNet (``EncoderDecoder``) -> :class:`gczoo.models.segmentation.SegmentationModel`.

    Names are mapped one to one (:data:`_MMSEG_RENAMES`; mmcv's ``ConvModule`` ``.conv``/``.bn``
    become ``.0``/``.1``, ``gc_block`` the zoo's ``context_block``, ``nl_block``'s
    ``conv_out.{conv,bn}`` its ``out_conv``/``out_bn``); values are unchanged. The auxiliary head
    is dropped only when the model has none (built without ``aux_loss``). A key matching none of
    these names is passed through unchanged, so the strict check of :func:`filter_fn` reports it.
    """
    keep_aux = getattr(model, "aux_classifier", None) is not None
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("auxiliary_head.") and not keep_aux:
            continue
        new = _rename(key, _MMSEG_RENAMES)
        out[new] = value
    return out


CONVERTERS: Dict[str, Callable[[StateDict, nn.Module], StateDict]] = {
    "identity": identity,
    "mmdet_backbone": mmdet_backbone,
    "mmdet_maskrcnn": mmdet_maskrcnn,
    "mmseg_segmentor": mmseg_segmentor,
    "new_head": new_head,
    "torchvision_resnet": torchvision_resnet,
}

#: Converters whose output has no trained classifier (the head is the model's own initialisation).
HEADLESS = frozenset({"mmdet_backbone", "new_head"})


def is_zoo_layout(state_dict: StateDict, model: nn.Module) -> bool:
    """Whether ``state_dict`` is already in ``model``'s own layout (e.g. ``model.state_dict()`` saved to a file).

    The one test every command uses to tell the zoo's layout from an upstream one: the key sets are
    equal. No upstream layout has exactly the model's keys (mmdetection and mmsegmentation use other
    prefixes; a torchvision ResNet lacks the GC blocks), so a zoo-layout file is loaded as it is and
    any other goes through the tag's converter.
    """
    return set(state_dict) == set(model.state_dict())


def _check(converted: StateDict, model: nn.Module, classifier: str, what: str, arch: str) -> None:
    """Keys, shapes, dtypes and values of the converted checkpoint against the model, before loading.

    A classifier of another size is left to timm only where timm drops it (the model was built
    with ``num_classes`` other than the weights' ``pretrained_cfg["num_classes"]``); everywhere
    else a shape, a kind of dtype (floating / integer / bool) or a non-finite value that does
    not fit raises :class:`StateDictMismatchError`, never a bare ``load_state_dict`` error.
    """
    expected = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    timm_drops_classifier = getattr(model, "num_classes", None) != cfg.get("num_classes", getattr(model, "num_classes", None))
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                   for k, v in converted.items()
                   if k in expected and tuple(v.shape) != tuple(expected[k].shape)
                   and not (timm_drops_classifier and k.startswith(classifier + "."))]
    wrong_dtype = [f"{k}: checkpoint {v.dtype} vs model {expected[k].dtype}"
                   for k, v in converted.items() if k in expected and _kind(v.dtype) != _kind(expected[k].dtype)]
    non_finite = [k for k, v in converted.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if missing or unexpected or wrong_shape or wrong_dtype or non_finite:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        lines = [f"{what} does not fit {arch}:"]
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        if wrong_shape:
            lines.append(f"  shape mismatches: {show(wrong_shape)}")
        if wrong_dtype:
            lines.append(f"  dtype mismatches: {show(wrong_dtype)}")
        if non_finite:
            lines.append(f"  NaN or infinite values in: {show(non_finite)}")
        lines.append("  Check that the checkpoint was made for this architecture (and its gc_ratio/gc_stages), "
                     "or build the model with the arguments the checkpoint was trained with.")
        raise StateDictMismatchError("\n".join(lines))


def _kind(dtype: torch.dtype) -> str:
    """floating / complex / bool / integer: a checkpoint may differ from the model in precision, not in kind."""
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integer"


def load_pretrained(model: nn.Module, arch: str, overlay: Optional[dict],
                    filter_fn: Optional[Callable[[StateDict, nn.Module], StateDict]]) -> None:
    """Load the weights handed to a zoo builder that timm does not drive (detection, segmentation).

    timm's convention, as :func:`gczoo.registry.entrypoint` passes it: ``overlay["state_dict"]``, or
    else ``overlay["file"]`` read by :func:`gczoo.weights.load_checkpoint`; then ``filter_fn`` (the
    converter with its strict check) and a strict ``load_state_dict``.
    """
    overlay = overlay or {}
    state_dict = overlay.get("state_dict")
    if state_dict is None:
        state_dict = load_checkpoint(overlay["file"], f"{arch} weights")
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


def filter_fn(arch: str, tag: Optional[str], converter: str, source: str) -> Callable[[StateDict, nn.Module], StateDict]:
    """timm ``pretrained_filter_fn`` applying ``converter`` and checking keys and shapes strictly.

    A state dict already in the model's layout (:func:`is_zoo_layout`) is not converted; the class layers of
    a model built for other classes are fitted before the check (:func:`gczoo.finetune.fit_classes`).
    ``tag`` None: weights of no manifest tag (a user's checkpoint)."""
    label = f"{arch}.{tag}" if tag else arch
    if converter not in CONVERTERS:
        raise ValueError(f"{label}: unknown converter {converter!r} (known: {', '.join(sorted(CONVERTERS))})")
    convert = CONVERTERS[converter]

    def apply(state_dict: StateDict, model: nn.Module) -> StateDict:
        if is_zoo_layout(state_dict, model):  # saved from a zoo model: nothing to convert
            converted, how = state_dict, "the zoo's layout"
        else:
            converted, how = convert(state_dict, model), f"converter {converter!r}"
        converted = finetune.fit_classes(converted, model, label)
        classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "fc")
        _check(converted, model, classifier, f"Weights {label} from {source} ({how})", arch)
        return converted

    return apply
