"""Global context blocks and the blocks GCNet compares them with.

Notation follows the GCNet paper (Cao et al., "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond"): ``x`` is a feature map with ``C`` channels
and ``Np = H * W`` positions.

* :class:`ContextBlock` -- the GC block, eq. (4):
  ``z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k x_j) x_j))``.
* :class:`SimplifiedNonLocalBlock` -- the simplified NL block, eq. (3):
  ``z_i = x_i + W_v sum_j softmax_j(W_k x_j) x_j``.
* :class:`NonLocalBlock` -- the embedded-Gaussian non-local block of NL-Net (Wang et al.),
  eq. (1)/(2) of GCNet.
* :class:`SqueezeExcitation` -- the SE block (Hu et al.), the paper's other point of comparison.

Parameter names of :class:`ContextBlock` (``conv_mask``, ``channel_add_conv.{0,1,3}``,
``channel_mul_conv.{0,1,3}``) are those of the public GCNet/mmcv checkpoints, so their
weights load by renaming prefixes only.

Every block accepts NCHW or channels_last input and runs under autocast; softmax is always
computed in fp32. Every block also takes video features ``(B, C, T, H, W)`` (NCTHW or
channels_last_3d), with ``Np = T * H * W``: it runs on the ``(B, C, T, H * W)`` view
(``flatten(3)``, which returns a 4-D input itself), where 1x1 convs, BatchNorm and pooling
over all positions compute what they would on the 5-D map.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ContextBlock",
    "SimplifiedNonLocalBlock",
    "NonLocalBlock",
    "SqueezeExcitation",
    "attention_pool",
    "GC_POOLINGS",
    "GC_FUSIONS",
    "parse_fusion",
    "fuse",
    "ContextTransform",
]

GC_POOLINGS = ("att", "avg")
GC_FUSIONS = ("add", "mul", "add+mul")


def parse_fusion(fusion: Union[str, Sequence[str]]) -> tuple:
    """Normalise a fusion spec (``"add"``, ``"mul"``, ``"add+mul"`` or a sequence) to a tuple."""
    parts = tuple(fusion.split("+")) if isinstance(fusion, str) else tuple(fusion)
    if not parts or any(p not in ("add", "mul") for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"gc_fusion must be one of {GC_FUSIONS}, got {fusion!r}")
    return tuple(p for p in ("add", "mul") if p in parts)


def attention_pool(x: torch.Tensor, mask_weight: torch.Tensor, mask_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Query-independent attention pooling, ``sum_j softmax_j(W_k x_j) x_j`` (GCNet eq. 3).

    ``x`` is ``(B, C, H, W)`` or ``(B, C, T, H, W)`` (pooling over all ``T * H * W`` positions).

    ``mask_weight`` holds the ``C`` weights of the 1x1 conv ``W_k`` (any shape, e.g. ``(1, C, 1, 1)``);
    ``mask_bias`` its bias or ``None``. Returns ``(B, C)``.

    Logits and pooling are two matrix products on a view of ``x``, never a copy: the
    ``(B, C, Np)`` view for NCHW input, the contiguous ``(B, Np, C)`` view for channels_last
    and under torch.compile on CPU (where the logits become a single matrix-vector product).
    The softmax runs in fp32 (fp64 for fp64 input) whatever the input dtype, also under autocast. When gradients are
    recorded, :class:`_AttentionPool`'s hand-written backward replaces autograd's; not under
    ``torch.jit.trace``, whose graph records the forward ops (the same values), so that a trace
    with gradients on equals its check run without them.
    """
    x = x.flatten(3)  # 5-D video features as (B, C, T, H*W); a 4-D x is returned as is
    b, c = x.shape[:2]
    key = mask_weight.reshape(c).to(x.dtype)
    rows_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not torch.jit.is_scripting() and x.device.type == "cpu":
        rows_last = rows_last or _compiling_for_cpu_kernels()
    # (B, Np, C) for channels_last, (B, C, Np) for NCHW: both views
    flat = x.permute(0, 2, 3, 1).reshape(b, -1, c) if rows_last else x.flatten(2)
    if not torch.jit.is_scripting() and torch.is_grad_enabled() and not torch.jit.is_tracing():
        return _attention_pool_recorded(flat, key, mask_bias, rows_last)
    return _pool(flat, _attention_weights(flat, key, mask_bias, rows_last), rows_last)


# torch.compiler.is_compiling / is_exporting are newer than the oldest torch this package supports;
# without them the compile-only route below is simply not taken
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


@torch.jit.unused
def _compiling_for_cpu_kernels() -> bool:
    """Whether torch.compile (not torch.export) is tracing. Inductor lays out CPU conv
    activations channels-last whatever the input's format, so there the ``(B, Np, C)`` view is
    the free one; on ``(B, C, Np)`` it writes a transposed second copy of the pooled map
    (GC-ResNet-50, batch 8: the four c3 kernels that make and pool it took 10.4 ms, 2.4 ms on
    the view)."""
    return _is_compiling() and not _is_exporting()


def _attention_weights(flat: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor],
                       rows_last: bool) -> torch.Tensor:
    """``softmax_j(key . x_j + bias)`` as ``(B, 1, Np)`` in ``flat``'s dtype (softmax in fp32 or fp64)."""
    b, c = flat.shape[0], key.shape[0]
    if rows_last:
        logits = torch.matmul(flat, key).unsqueeze(1)  # (B, 1, Np)
    else:
        # bmm, not matmul: matmul may fold the batch into one mm, which copies an NCHW input
        logits = torch.bmm(key.reshape(1, 1, c).expand(b, 1, c), flat)  # (B, 1, Np)
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(flat.dtype)


def _pool(flat: torch.Tensor, attn: torch.Tensor, rows_last: bool) -> torch.Tensor:
    """``sum_j attn_j x_j`` as ``(B, C)``."""
    if rows_last:
        return torch.bmm(attn, flat).flatten(1)
    return torch.bmm(flat, attn.transpose(1, 2)).flatten(1)


class _AttentionPool(torch.autograd.Function):
    """Attention pooling with a backward that reads ``x`` twice and writes its gradient once.

    With ``a = softmax(l)``, ``l_j = k . x_j + b`` and ``g`` the gradient of the pooled
    context ``sum_j a_j x_j``: ``dL/dl_j = a_j (g . x_j - sum_i a_i g . x_i)``, so
    ``dL/dx_j = a_j g + (dL/dl_j) k`` -- a rank-2 product, one matrix product for the whole
    map -- and ``dL/dk = sum_j (dL/dl_j) x_j``. Autograd's generic backward of the two
    products and the softmax writes two map-sized gradients and adds them.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor],
                rows_last: bool) -> torch.Tensor:
        attn = _attention_weights(flat, key, bias, rows_last)
        ctx.save_for_backward(flat, key, attn)
        ctx.rows_last = rows_last
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _pool(flat, attn, rows_last)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        flat, key, attn = ctx.saved_tensors
        b, c = grad.shape
        g = grad.to(flat.dtype).unsqueeze(1)  # (B, 1, C)
        with torch.autocast(flat.device.type, enabled=False):
            if ctx.rows_last:
                gx = torch.bmm(flat, g.transpose(1, 2)).transpose(1, 2)  # g . x_j: (B, 1, Np)
            else:
                gx = torch.bmm(g, flat)
            grad_logits = attn * (gx - (attn * gx).sum(-1, keepdim=True))  # (B, 1, Np)
            grad_flat = grad_key = grad_bias = None
            if ctx.needs_input_grad[0]:
                left = torch.cat([g, key.reshape(1, 1, c).expand(b, 1, c)], 1)  # (B, 2, C)
                right = torch.cat([attn, grad_logits], 1)  # (B, 2, Np)
                if ctx.rows_last:
                    grad_flat = torch.bmm(right.transpose(1, 2), left)  # (B, Np, C)
                else:
                    grad_flat = torch.bmm(left.transpose(1, 2), right)  # (B, C, Np)
            if ctx.needs_input_grad[1]:
                if ctx.rows_last:
                    grad_key = torch.bmm(grad_logits, flat).sum(0).reshape(c)
                else:
                    grad_key = torch.bmm(flat, grad_logits.transpose(1, 2)).sum(0).reshape(c)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = grad_logits.sum().reshape(1).to(ctx.bias_dtype)
        return grad_flat, grad_key, grad_bias, None


@torch.jit.unused
def _attention_pool_recorded(flat: torch.Tensor, key: torch.Tensor, bias: Optional[torch.Tensor],
                             rows_last: bool) -> torch.Tensor:
    """:class:`_AttentionPool` (TorchScript keeps autograd's backward of the same forward)."""
    return _AttentionPool.apply(flat, key, bias, rows_last)


def fuse(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
         inplace: bool = False) -> torch.Tensor:
    """``x * scale + shift`` with ``(B, C)`` or ``(C,)`` terms broadcast over positions.

    Either term may be ``None`` (not both); they are cast to ``x.dtype`` so the result keeps it. The
    result is a new tensor in ``x``'s memory format. For channels_last input this is one
    ``addcmul`` pass; for NCHW, where the CPU ``addcmul`` kernel is slow with per-row
    broadcast terms, a multiply and an in-place add (measured faster than the one pass).
    With ``inplace`` and no scale, the shift is added into ``x`` itself (no new tensor of the
    feature map's size): for an ``x`` nothing else needs, such as a norm layer's fresh output.
    TorchScript compiles it; torch.fx keeps it as one call (its route depends on the memory format).
    """
    c = x.shape[1]
    if scale is None:
        if shift is None:
            raise ValueError("fuse needs a scale, a shift or both; got neither")
        shift = shift.to(x.dtype).reshape(-1, c, 1, 1)
        return x.add_(shift) if inplace else x + shift
    scale = scale.to(x.dtype).reshape(-1, c, 1, 1)
    if shift is None:
        return x * scale
    shift = shift.to(x.dtype).reshape(-1, c, 1, 1)
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.addcmul(shift, x, scale)
    return (x * scale).add_(shift)


def _like_input(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A block's result computed on ``x.flatten(3)``, in ``x``'s shape.

    For 4-D input that is ``out`` itself, not a view of it: callers add into a block's output
    in place (the bottleneck's ``out += shortcut``, in-place ReLU), and autograd records an
    in-place op on a view as a copy of the whole base tensor and its gradient.
    """
    return out if out.dim() == x.dim() else out.view_as(x)


# torch.fx records each of these as one call, and the eager code runs when the graph does: their
# route depends on the input's memory format or rank, which a symbolic trace does not know.
torch.fx.wrap("attention_pool")
torch.fx.wrap("fuse")
torch.fx.wrap("_like_input")


class ContextTransform(nn.Sequential):
    """GC transform ``W_v2 ReLU(LN(W_v1 .))`` as 1x1 convs (``0``, ``1``, ``3``: the layout of GCNet checkpoints)."""

    def __init__(self, hidden: int, channels: int):
        super().__init__(nn.Conv2d(channels, hidden, 1), nn.LayerNorm([hidden, 1, 1]), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, channels, 1))

    def forward_vectors(self, context: torch.Tensor) -> torch.Tensor:
        """The transform of ``(B, C)`` context vectors, with matrix products.

        A 1x1 conv on a 1x1 map is a linear map and LayerNorm over ``(C/r, 1, 1)`` is a LayerNorm
        over ``C/r``; computing them on vectors avoids the per-call overhead of conv kernels on
        tiny spatial maps while using the very same parameters.
        """
        conv_in = self[0]
        norm = self[1]
        conv_out = self[3]
        hidden = conv_in.out_channels
        y = F.linear(context, conv_in.weight.reshape(hidden, -1), conv_in.bias)
        y = F.layer_norm(y, (hidden,), norm.weight.reshape(hidden), norm.bias.reshape(hidden), norm.eps)
        y = F.relu(y)
        return F.linear(y, conv_out.weight.reshape(conv_out.out_channels, hidden), conv_out.bias)


class ContextBlock(nn.Module):
    """Global context (GC) block, GCNet eq. (4).

    Args:
        channels: ``C``, channels of the input and output.
        ratio: bottleneck ratio of the transform; the hidden width is ``int(C * ratio)``
            (1/16 is the paper's r16, 1/4 its r4), as in the public checkpoints.
        pooling: ``"att"`` (attention pooling, the paper's default) or ``"avg"`` (global
            average pooling, the SE-like ablation).
        fusion: ``"add"`` (broadcast addition, default), ``"mul"`` (sigmoid scaling) or
            ``"add+mul"``. With both, scaling is applied first, then addition.

    The last conv of each transform starts at zero, so a new block is exactly the identity
    (the "last zero init" of the GCNet code); ``conv_mask`` uses Kaiming fan-in init.
    """

    def __init__(self, channels: int, ratio: float = 1 / 16, pooling: str = "att",
                 fusion: Union[str, Sequence[str]] = "add"):
        super().__init__()
        if pooling not in GC_POOLINGS:
            raise ValueError(f"gc_pooling must be one of {GC_POOLINGS}, got {pooling!r}")
        hidden = int(channels * ratio)
        if not 0 < hidden:
            raise ValueError(f"gc_ratio={ratio} leaves no hidden channels for {channels} input channels")
        self.channels = channels
        self.ratio = ratio
        self.pooling = pooling
        self.fusion = parse_fusion(fusion)
        self.conv_mask = nn.Conv2d(channels, 1, 1) if pooling == "att" else None
        self.channel_add_conv = ContextTransform(hidden, channels) if "add" in self.fusion else None
        self.channel_mul_conv = ContextTransform(hidden, channels) if "mul" in self.fusion else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.conv_mask is not None:
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for seq in (self.channel_add_conv, self.channel_mul_conv):
            if seq is not None:
                nn.init.zeros_(seq[-1].weight)
                nn.init.zeros_(seq[-1].bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Context modelling: the pooled ``(B, C)`` global context of ``x``."""
        if self.conv_mask is None:
            return x.flatten(3).mean(dim=(2, 3))
        return attention_pool(x, self.conv_mask.weight, self.conv_mask.bias)

    def context_of_affine(self, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                          weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The context of ``z = scale * (weight @ h) + shift`` computed from ``h``, without ``z``.

        ``z`` is a per-position affine map of ``h`` (``weight``: ``(C, C_h)``, identity when
        ``None``; ``scale``, ``shift``: ``(C,)``), as conv3 + BatchNorm are in eval mode. Both
        poolings commute with it: the logits are ``(W^T (scale * w_k)) . h_j + b_k`` plus the
        constant ``w_k . shift`` that the softmax ignores (``b_k`` is kept, so that it gets its
        gradient -- zero -- as on the plain route, e.g. for DDP), and because the attention weights (or the 1/Np of average
        pooling) sum to one, ``pool(z) = scale * (W pool(h)) + shift``. Reading ``h`` instead
        of ``z`` is cheaper when ``h`` is narrower (the bottleneck's ``C/4`` channels).
        """
        if self.conv_mask is None:
            pooled = h.mean(dim=(2, 3))
        else:
            key = scale * self.conv_mask.weight.reshape(-1)
            if weight is not None:
                key = torch.matmul(key, weight)
            pooled = attention_pool(h, key, self.conv_mask.bias)
        if weight is not None:
            pooled = F.linear(pooled, weight)
        return torch.addcmul(shift.to(pooled.dtype), pooled, scale.to(pooled.dtype))

    def fusion_terms(self, context: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(scale, shift)``, each ``(B, C)`` or ``None``: the block maps ``x`` to ``x * scale + shift``.

        ``scale = sigmoid(W_mul(context))`` for "mul" fusion, ``shift = W_add(context)`` for "add".
        """
        scale: Optional[torch.Tensor] = None
        shift: Optional[torch.Tensor] = None
        if self.channel_mul_conv is not None:
            scale = torch.sigmoid(self.channel_mul_conv.forward_vectors(context))
        if self.channel_add_conv is not None:
            shift = self.channel_add_conv.forward_vectors(context)
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.fusion_terms(self.context(x))
        return _like_input(fuse(x.flatten(3), scale, shift), x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, ratio={self.ratio}, pooling={self.pooling!r}, fusion={'+'.join(self.fusion)!r}"


class SimplifiedNonLocalBlock(nn.Module):
    """Simplified non-local block, GCNet eq. (3): attention pooling, then a 1x1 conv ``C -> C``.

    ``transform`` starts at zero, so a new block is the identity.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.conv_mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Conv2d(channels, channels, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.transform.weight)
        nn.init.zeros_(self.transform.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = attention_pool(x, self.conv_mask.weight, self.conv_mask.bias)
        b, c = context.shape
        # the weight's shape from the module, not from context: FX quantization traces a weight's
        # producers alone, without the input attention_pool needs
        delta = F.linear(context, self.transform.weight.flatten(1), self.transform.bias)
        return _like_input(x.flatten(3) + delta.reshape(b, c, 1, 1), x)


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block (Wang et al., NL-Net; GCNet eq. 1-2).

    ``z_i = x_i + BN(W_z sum_j softmax_j(theta(x_i)^T phi(x_j)) g(x_j))`` with ``theta``,
    ``phi``, ``g`` 1x1 convs to ``C/2`` channels and ``W_z`` a 1x1 conv back to ``C``.
    As in NL-Net the BN after ``W_z`` starts with zero scale, so a new block is the identity.
    The pairwise softmax is unscaled, as in NL-Net's embedded Gaussian; ``scale=True`` divides
    ``theta^T phi`` by ``sqrt(C/2)`` first (mmcv's ``NonLocal2d(use_scale=True)``, the NL head of
    mmsegmentation's NLNet).
    """

    def __init__(self, channels: int, reduction: int = 2, scale: bool = False):
        super().__init__()
        inner = channels // reduction
        self.channels = channels
        self.scale = scale
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.g = nn.Conv2d(channels, inner, 1)
        self.out_conv = nn.Conv2d(inner, channels, 1, bias=False)
        self.out_bn = nn.BatchNorm2d(channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.theta, self.phi, self.g, self.out_conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        self.out_bn.reset_parameters()
        nn.init.zeros_(self.out_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        original = x
        x = x.flatten(3)  # video (B, C, T, H, W) as (B, C, T, H*W): the same positions for 1x1 convs and BN
        b, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # (B, Np, C')
        key = self.phi(x).flatten(2)  # (B, C', Np)
        value = self.g(x).flatten(2).transpose(1, 2)  # (B, Np, C')
        logits = torch.bmm(query, key).float()
        if self.scale:
            logits = logits / query.shape[-1] ** 0.5
        attn = torch.softmax(logits, dim=-1).to(value.dtype)
        y = torch.bmm(attn, value).transpose(1, 2).reshape(b, -1, h, w)
        return _like_input(x + self.out_bn(self.out_conv(y)), original)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation block (Hu et al.): ``x * sigmoid(W_2 ReLU(W_1 avgpool(x)))``."""

    def __init__(self, channels: int, ratio: float = 1 / 16):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.channels = channels
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        s = x.flatten(3).mean(dim=(2, 3))
        s = F.relu(F.linear(s, self.fc1.weight.reshape(-1, c), self.fc1.bias))
        s = torch.sigmoid(F.linear(s, self.fc2.weight.reshape(c, -1), self.fc2.bias))
        return _like_input(x.flatten(3) * s.reshape(b, c, 1, 1), x)
