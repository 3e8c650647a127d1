"""Is a model's context query-independent? GCNet's statistical analysis of NL networks (Cao et al.), for any model.

GCNet starts from one observation: in trained non-local (NL) networks the attention maps of
different query positions are almost the same (mean cosine distance 0.004 on ImageNet, 0.020
on COCO, 0.115 on Kinetics; 0.383 on Cityscapes, the exception). :func:`query_independence`
measures it on any model that holds the zoo's :class:`~gczoo.blocks.NonLocalBlock`,
:class:`~gczoo.blocks.SimplifiedNonLocalBlock` or :class:`~gczoo.blocks.ContextBlock` (or timm's
``GlobalContext``, the GC layer of the zoo's timm family), found by type, so classifiers, detection
backbones, video models and users' own models alike: for each
block, the mean cosine distance ``1 - cos`` over all pairs of distinct positions of one image of

* ``input``: the block's input features ``x_i``;
* ``attention``: the attention maps of the query positions (row ``i`` of ``softmax(theta(x)^T phi(x))``
  for NL blocks). SNL and GC blocks compute one map for every query by construction (GCNet eq. 3):
  0, and ``attention_note`` says so;
* ``output``: what the block adds to its input, ``block(x_i) - x_i`` (the NL block's
  ``BN(W_z y_i)``; the transform term of SNL and GC blocks), i.e. its output before the residual addition.

Every pair is counted, exactly, in ``O(positions x channels)``: with unit vectors ``u_i``,
``sum_{i != j} (1 - u_i . u_j) = N * sum_i |u_i - mean(u)|^2`` (a dispersion, numerically stable,
accumulated chunk by chunk for attention maps). Positions whose vector is zero have no direction
and are left out; with fewer than two left the distance is NaN (e.g. the output of a block whose
last layer is still zero-initialised). Per image, then averaged over images (NaN images skipped).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import GlobalContext
from torch import nn

from .blocks import ContextBlock, NonLocalBlock, SimplifiedNonLocalBlock

__all__ = ["BLOCK_TYPES", "BlockDistances", "query_independence", "mean_cosine_distance", "block_inputs",
           "attention_maps", "markdown_table", "plot_attention_maps"]

#: Blocks whose context the analysis measures (timm's GlobalContext: the GC layer of the zoo's timm family).
BLOCK_TYPES = (NonLocalBlock, SimplifiedNonLocalBlock, ContextBlock, GlobalContext)

_ONE_MAP = "one attention map for every query, by construction (GCNet eq. 3)"
#: Attention rows computed at once: chunk x positions floats.
_CHUNK_ELEMENTS = 1 << 22


class _Dispersion:
    """Running ``sum_i |u_i - mean(u)|^2`` of unit vectors ``u_i`` (pairwise merge of Chan et al.), in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, 0.0

    def add(self, vectors: torch.Tensor) -> None:
        v = vectors.reshape(vectors.shape[0], -1).double()
        norms = v.norm(dim=1)
        u = v[norms > 0] / norms[norms > 0, None]
        k = u.shape[0]
        if k == 0:
            return
        mean = u.mean(0)
        m2 = float((u - mean).square().sum())
        if self.count == 0:
            self.count, self.mean, self.m2 = k, mean, m2
            return
        total = self.count + k
        delta = mean - self.mean
        self.m2 += m2 + float(delta.dot(delta)) * self.count * k / total
        self.mean = self.mean + delta * (k / total)
        self.count = total

    def distance(self) -> float:
        """Mean ``1 - cos`` over ordered pairs of distinct (nonzero) vectors: ``sum_i |u_i - mean|^2 / (N - 1)``."""
        return self.m2 / (self.count - 1) if self.count >= 2 else math.nan


def mean_cosine_distance(vectors: torch.Tensor) -> float:
    """Mean of ``1 - cos(v_i, v_j)`` over all pairs ``i != j`` of the rows of ``vectors`` ``(N, D)``, in O(N D).

    Zero rows (no direction) are left out; NaN when fewer than two rows remain.
    """
    acc = _Dispersion()
    acc.add(vectors)
    return acc.distance()


@dataclasses.dataclass
class BlockDistances:
    """Mean cosine distances of one block (averaged over images; ``per_image`` on request)."""

    name: str
    kind: str  # "nl", "snl" or "gc"
    channels: int
    positions: int  # of the last image (T*H*W of the block's input)
    input: float
    attention: float
    output: float
    attention_note: str = ""
    per_image: Optional[List[Dict[str, float]]] = None


def _kind(block: nn.Module) -> str:
    return next(k for t, k in zip(BLOCK_TYPES, ("nl", "snl", "gc", "gc")) if isinstance(block, t))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode and no grad inside, the model's own mode restored after."""
    was_training = model.training
    try:
        with torch.no_grad():
            yield model.eval()
    finally:
        model.train(was_training)


def _find_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module, bool]]:
    """``(name, block, hooked module, hook its output?)`` for every block of ``model``.

    The zoo's bottlenecks may compute a GC block from ``conv3``'s output without calling the
    block (the eval-mode fold of :class:`gczoo.models.gc_resnet.Bottleneck`); the block's input
    is ``bn3``'s output on both routes, so that output is what gets recorded.
    """
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    found = []
    for name, block in model.named_modules():
        if not isinstance(block, BLOCK_TYPES):
            continue
        parent = parents.get(id(block))
        bn3 = getattr(parent, "bn3", None)
        if isinstance(block, ContextBlock) and getattr(parent, "context_block", None) is block and \
                isinstance(bn3, nn.Module):
            found.append((name, block, bn3, True))
        else:
            found.append((name, block, block, False))
    return found


def _default_forward(model: nn.Module, image: torch.Tensor) -> Any:
    """torchvision detection models take a list of images; other models a batch of one."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return model([image]) if isinstance(model, GeneralizedRCNN) else model(image.unsqueeze(0))


def _capture(model: nn.Module, image: torch.Tensor, forward: Optional[Callable] = None
             ) -> Tuple[Dict[str, Tuple[nn.Module, List[torch.Tensor]]], Optional[torch.Tensor]]:
    """Run ``model`` on one image (eval mode, no grad): ``({name: (block, inputs of each call)}, network input)``.

    Blocks that did not run are left out; a block runs more than once e.g. in sliding-window inference.
    """
    found = _find_blocks(model)
    if not found:
        raise ValueError(f"{type(model).__name__} holds no NonLocalBlock, SimplifiedNonLocalBlock or ContextBlock "
                         f"of gczoo.blocks (nor timm's GlobalContext): there is nothing to analyse")
    seen: Dict[str, List[torch.Tensor]] = {name: [] for name, *_ in found}
    first_conv: List[torch.Tensor] = []
    handles = []
    for name, _, module, on_output in found:
        if on_output:
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: seen[name].append(out.detach())))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: seen[name].append(a[0].detach())))
    conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    if conv is not None:
        handles.append(conv.register_forward_pre_hook(
            lambda m, a: first_conv.append(a[0].detach()) if not first_conv else None))
    try:
        with _eval_mode(model):
            (forward or _default_forward)(model, image)
    finally:
        for h in handles:
            h.remove()
    if not any(seen.values()):
        raise RuntimeError(f"none of the {len(found)} blocks of {type(model).__name__} ran in its forward pass")
    blocks = {name: block for name, block, *_ in found}
    return ({name: (blocks[name], inputs) for name, inputs in seen.items() if inputs},
            first_conv[0] if first_conv else None)


def block_inputs(model: nn.Module, image: torch.Tensor, forward: Optional[Callable] = None
                 ) -> Tuple[Dict[str, Tuple[nn.Module, torch.Tensor]], Optional[torch.Tensor]]:
    """Run ``model`` on one image (eval mode, no grad) and return ``({name: (block, input)}, network input)``.

    ``input`` is the block's input on its first call. The network input is what the model's
    first convolution saw (after the model's own resizing, normalisation and padding), for
    drawing maps over it.
    """
    captured, network_input = _capture(model, image, forward)
    return {name: (block, inputs[0]) for name, (block, inputs) in captured.items()}, network_input


def _positions(x: torch.Tensor) -> torch.Tensor:
    """``(Np, C)`` position vectors of a ``(1, C, ...)`` feature map."""
    if x.shape[0] != 1:
        raise ValueError(f"expected the features of one image, got a batch of {x.shape[0]}")
    return x.flatten(2)[0].t()


def _nl_projections(block: NonLocalBlock, x: torch.Tensor):
    """``(x as 4-D, query, key, value)``; the query carries the block's optional ``1/sqrt(C')`` logit scale."""
    x4 = x.flatten(3).float()
    query = block.theta(x4).flatten(2)[0].t()  # (Np, C')
    if getattr(block, "scale", False):  # scaled dot product (mmcv's NonLocal2d use_scale)
        query = query / query.shape[-1] ** 0.5
    key = block.phi(x4).flatten(2)[0]  # (C', Np)
    value = block.g(x4).flatten(2)[0].t()  # (Np, C')
    return x4, query, key, value


def _chunks(n: int, positions: int):
    step = max(1, _CHUNK_ELEMENTS // max(positions, 1))
    return (slice(i, min(i + step, n)) for i in range(0, n, step))


def attention_maps(block: nn.Module, x: torch.Tensor, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention maps over all positions of ``x`` ``(1, C, ...)``: rows ``queries`` of an NL block's
    ``softmax(theta(x)^T phi(x))``; for SNL and GC blocks the one map ``softmax(W_k x)`` (one row;
    the mean (uniform) map for average pooling). Shape ``(rows, Np)``, each row summing to one.
    """
    with torch.no_grad():
        if isinstance(block, NonLocalBlock):
            _, query, key, _ = _nl_projections(block, x)
            query = query if queries is None else query[queries]
            return torch.softmax(query @ key, dim=-1)
        flat = x.flatten(2)[0].float()  # (C, Np)
        mask = block.conv_attn if isinstance(block, GlobalContext) else block.conv_mask
        if mask is None:
            return torch.full((1, flat.shape[1]), 1.0 / flat.shape[1])
        logits = mask.weight.reshape(1, -1).float() @ flat + (0 if mask.bias is None else mask.bias.float())
        return torch.softmax(logits, dim=-1)


def _distances(block: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """Input, attention and output distances of one block on its input ``x`` ``(1, C, ...)``."""
    with torch.no_grad():
        x = x.float()
        result = {"input": mean_cosine_distance(_positions(x))}
        if isinstance(block, NonLocalBlock):
            x4, query, key, value = _nl_projections(block, x)
            n = query.shape[0]
            attention, y = _Dispersion(), torch.empty_like(value)
            for rows in _chunks(n, n):
                attn = torch.softmax(query[rows] @ key, dim=-1)
                attention.add(attn)
                y[rows] = attn @ value
            y = y.t().reshape(1, -1, *x4.shape[2:])
            result["attention"] = attention.distance()
            delta = block.out_bn(block.out_conv(y))
        else:
            result["attention"] = 0.0
            if isinstance(block, SimplifiedNonLocalBlock):
                context = attention_maps(block, x) @ x.flatten(2)[0].t()  # (1, C)
                c = context.shape[1]
                delta = torch.nn.functional.linear(context, block.transform.weight.reshape(c, c), block.transform.bias)
                delta = delta.reshape(1, c, 1).expand(1, c, x.flatten(2).shape[2])
            elif isinstance(block, GlobalContext):  # timm's layer returns the fused x: subtract x in float64
                delta = copy.deepcopy(block).double()(x.double()) - x.double()
            else:
                scale, shift = block.fusion_terms(block.context(x))
                flat = x.flatten(2)
                delta = torch.zeros_like(flat)
                if scale is not None:
                    delta = delta + flat * (scale - 1).unsqueeze(-1)
                if shift is not None:
                    delta = delta + shift.unsqueeze(-1)
        result["output"] = mean_cosine_distance(_positions(delta))
    return result


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _as_images(images: Union[torch.Tensor, Iterable[torch.Tensor]]) -> List[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() < 3:
            raise ValueError(f"images: expected (N, C, H, W), (N, C, T, H, W) or a list of per-image tensors, "
                             f"got shape {tuple(images.shape)}")
        return list(images.unbind(0))
    return list(images)


def query_independence(model: nn.Module, images: Union[torch.Tensor, Iterable[torch.Tensor]],
                       per_image: bool = False, forward: Optional[Callable[[nn.Module, torch.Tensor], Any]] = None,
                       progress: Optional[Callable[[Iterable], Iterable]] = None) -> List[BlockDistances]:
    """Mean cosine distances of the input, attention maps and output of every NL / SNL / GC block of ``model``.

    Args:
        model: any module holding the zoo's blocks (run in eval mode, no grad; its mode is restored).
        images: ``(N, C, H, W)`` / ``(N, C, T, H, W)`` tensor or a list of per-image tensors, each
            run on its own (``model(image[None])``; torchvision detection models get ``model([image])``).
        per_image: also return each image's numbers in ``BlockDistances.per_image``.
        forward: ``forward(model, image)`` to run the model some other way.
        progress: wraps the image iterator (e.g. ``tqdm``).

    Returns one :class:`BlockDistances` per block that ran, in module order. A block that runs
    several times per image (e.g. sliding-window inference) gives the mean over its calls.
    """
    return _query_independence(model, images, per_image, forward, progress)[0]


def _query_independence(model, images, per_image=False, forward=None, progress=None, keep_first=False):
    """:func:`query_independence`, and with ``keep_first`` the first image's :func:`block_inputs`."""
    images = _as_images(images)
    if not images:
        raise ValueError("images: no image given")
    rows: Dict[str, List[Dict[str, float]]] = {}
    meta: Dict[str, Tuple[nn.Module, int, int]] = {}
    first = None
    for image in (progress(images) if progress else images):
        captured, network_input = _capture(model, image, forward)
        with _eval_mode(model):
            for name, (block, inputs) in captured.items():  # several calls (sliding windows): their mean
                calls = [_distances(block, x) for x in inputs]
                rows.setdefault(name, []).append({k: _nanmean([c[k] for c in calls]) for k in calls[0]})
                meta[name] = (block, inputs[-1].shape[1], inputs[-1].flatten(2).shape[2])
        if keep_first and first is None:
            first = ({name: (block, inputs[0]) for name, (block, inputs) in captured.items()}, network_input)
    results = []
    for name, per in rows.items():
        block, channels, positions = meta[name]
        kind = _kind(block)
        results.append(BlockDistances(
            name=name, kind=kind, channels=channels, positions=positions,
            input=_nanmean([r["input"] for r in per]), attention=_nanmean([r["attention"] for r in per]),
            output=_nanmean([r["output"] for r in per]), attention_note="" if kind == "nl" else _ONE_MAP,
            per_image=per if per_image else None))
    return results, first


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def markdown_table(results: Sequence[BlockDistances], title: str) -> str:
    """The paper's layout: one row per block, then the mean over NL blocks, cosine distances of
    input / attention map / output."""
    lines = [f"| {title} | block | channels | positions | input | attention map | output |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        attention = _fmt(r.attention) + ("" if r.kind == "nl" else " (one map)")
        lines.append(f"| | `{r.name}` ({r.kind.upper()}) | {r.channels} | {r.positions} | {_fmt(r.input)} | "
                     f"{attention} | {_fmt(r.output)} |")
    nl = [r for r in results if r.kind == "nl"]
    if len(nl) > 1:
        lines.append(f"| | mean of {len(nl)} NL blocks | | | {_fmt(_nanmean([r.input for r in nl]))} | "
                     f"{_fmt(_nanmean([r.attention for r in nl]))} | {_fmt(_nanmean([r.output for r in nl]))} |")
    return "\n".join(lines)


def _nan_to_none(value: Any) -> Any:
    """NaN -> None in nested dicts and lists (strict JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the attention-map figure needs matplotlib: pip install 'gczoo[analysis]'") from err
    return plt


def _display(picture: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` network input scaled to 0-1 per channel, for display, as ``(H, W, 3)``."""
    p = picture.float()
    low = p.amin(dim=(1, 2), keepdim=True)
    high = p.amax(dim=(1, 2), keepdim=True)
    return ((p - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0)


def _panels(block: nn.Module, x: torch.Tensor, queries: int) -> List[Tuple[torch.Tensor, Optional[tuple], tuple]]:
    """``(map of the middle frame, query (row, col) or None, grid (h, w))`` per panel of one block."""
    t, h, w = tuple(x.shape[2:]) if x.dim() == 5 else (1, *x.shape[2:])
    frame = t // 2
    if isinstance(block, NonLocalBlock):
        fractions = [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75), (0.5, 0.5)][:queries]
        points = [(min(h - 1, int(fy * h)), min(w - 1, int(fx * w))) for fy, fx in fractions]
        maps = attention_maps(block, x, torch.tensor([(frame * h + py) * w + px for py, px in points]))
    else:
        points, maps = [None], attention_maps(block, x)
    return [(m.reshape(t, h, w)[frame], point, (h, w)) for m, point in zip(maps, points)]


def plot_attention_maps(captured: Dict[str, Tuple[nn.Module, torch.Tensor]], network_input: torch.Tensor,
                        path: Union[str, Path], queries: int = 4, title: str = "") -> Path:
    """Draw the attention maps of ``queries`` query pixels of each NL block (a row per block, the
    query pixels marked) and the single map of each SNL / GC block, over the network input.

    Video features ``(T, H, W)`` show the middle frame (queries there, maps of that frame).
    """
    plt = _require_matplotlib()
    picture = network_input[0]
    if picture.dim() == 4:  # (C, T, H, W): the middle frame
        picture = picture[:, picture.shape[1] // 2]
    picture = _display(picture).numpy()
    height, width = picture.shape[:2]
    has_nl = any(isinstance(b, NonLocalBlock) for b, _ in captured.values())
    cols = queries if has_nl else min(4, len(captured))
    rows: List[list] = []  # each NL block a row of its own; single-map blocks packed `cols` to a row
    for name, (block, x) in captured.items():
        label = f"{name} ({_kind(block).upper()})"
        panels = [(label, *panel) for panel in _panels(block, x, queries)]
        if isinstance(block, NonLocalBlock) or not rows or len(rows[-1]) >= cols or rows[-1][0][2] is not None:
            rows.append(panels)
        else:
            rows[-1].extend(panels)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.4 * cols, 2.4 * len(rows) + 0.3), squeeze=False,
                             layout="constrained")
    for r, panels in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(panels):
                continue
            label, heat, point, (h, w) = panels[c]
            ax.imshow(picture)
            ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, extent=(0, width, height, 0), interpolation="bilinear")
            if point is not None:
                ax.plot((point[1] + 0.5) * width / w, (point[0] + 0.5) * height / h, marker="*", color="white",
                        markeredgecolor="black", markersize=14)
                label += f"\nquery {c + 1}"
            else:
                label += "\none map for all queries"
            ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return path


#: Frames of the static clip a video model gets from one image (the paper's 8-frame input).
VIDEO_FRAMES = 8


def _load_model(name: str, checkpoint: Optional[Union[str, Path]],
                weights_file: Optional[Union[str, Path]] = None) -> Tuple[nn.Module, str]:
    """The model of ``NAME[.TAG]`` and a note on its weights, by the rule of every command
    (:func:`gczoo.loading.model_for_command`: a checkpoint in the zoo's or the tag's upstream layout, a
    verified copy of the tag's file, the tag's download, else seeded random initialisation)."""
    from .loading import model_for_command

    loaded = model_for_command(name, "gczoo analyze {name} IMAGE... --out DIR --weights-file FILE",
                               checkpoint=None if checkpoint is None else Path(checkpoint),
                               weights_file=None if weights_file is None else Path(weights_file))
    return loaded.model, loaded.note


def _image_input(model: nn.Module, family: str, path: Path) -> torch.Tensor:
    """One image file as the model's input: 0-1 RGB at the test scale for detection models, the model's
    own eval transform for classifiers, a static clip of :data:`VIDEO_FRAMES` frames for video models.
    Pictures are bounded in pixels before decoding (:func:`gczoo.fileio.read_image`)."""
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms.functional import to_tensor

    from .fileio import read_image

    if family == "maskrcnn":  # at the detector's test scale (its own transform would resize it there)
        return to_tensor(read_image(path, fit=model.pretrained_cfg["input_size"][1:]))
    picture = read_image(path)
    if family == "slowonly":
        frame = create_transform(**resolve_data_config({"input_size": (3, 224, 224)}))(picture)
        return frame.unsqueeze(1).expand(-1, VIDEO_FRAMES, -1, -1).contiguous()
    return create_transform(**resolve_data_config({}, model=model))(picture)


def analyze_command(name: str, images: Sequence[Union[str, Path]], out: Union[str, Path],
                    checkpoint: Optional[Union[str, Path]] = None, queries: int = 4,
                    weights_file: Optional[Union[str, Path]] = None) -> Dict[str, Path]:
    """``gczoo analyze``: the table (markdown and JSON) over ``images`` and the attention-map figure of the first.

    Writes ``query_independence.md``, ``query_independence.json`` and ``attention_maps.png`` into ``out``.
    """
    from huggingface_hub.utils import tqdm

    from .fileio import atomic_path
    from .registry import model_entry, split_name

    _require_matplotlib()  # before minutes of work, not after
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"no image file at {p}")
    family = model_entry(split_name(name)[0])["family"]
    model, weights_note = _load_model(name, checkpoint, weights_file)
    inputs = [_image_input(model, family, p) for p in paths]
    started, cpu_started = time.perf_counter(), time.process_time()
    progress = (lambda it: tqdm(it, desc="images", unit="image")) if len(inputs) > 1 else None
    results, (captured, network_input) = _query_independence(model, inputs, per_image=True, progress=progress,
                                                             keep_first=True)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out / "query_independence.md", "json": out / "query_independence.json",
               "figure": out / "attention_maps.png"}
    note = (f"{weights_note}. Mean cosine distance (1 - cos) over all pairs of distinct positions, averaged over "
            f"{len(paths)} image(s){' (static 8-frame clips)' if family == 'slowonly' else ''}; n/a (null in the "
            f"JSON): no direction to compare, the block adds nothing (e.g. a zero-initialised last layer); "
            f"{seconds:.1f} s ({cpu_seconds:.1f} CPU s) for the analysis.")
    text = f"# Query independence of {name}\n\n{markdown_table(results, name)}\n\n{note}\n"
    with atomic_path(written["markdown"]) as tmp:
        tmp.write_text(text, encoding="utf-8")
    report = {"model": name, "weights": weights_note, "images": [str(p) for p in paths], "seconds": seconds,
              "cpu_seconds": cpu_seconds, "blocks": [_nan_to_none(dataclasses.asdict(r)) for r in results]}
    with atomic_path(written["json"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    with atomic_path(written["figure"]) as tmp:
        plot_attention_maps(captured, network_input, tmp, queries=queries, title=f"{name}: {paths[0].name}")
    print(text)
    return written
