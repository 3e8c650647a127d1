"""The GC block's fast path against the straightforward formulation (issue 6).

The reference is ``bench/reference.py``'s :class:`StraightforwardContextBlock` (1x1 conv,
reshape, softmax, matmul, transform as convs on 1x1 maps, out-of-place add). Every check
runs real forward (and backward) passes on CPU in fp32 and compares to 1e-5; the weights
are random (non-zero transforms, non-trivial BatchNorm statistics) so that no term can
vanish. Nothing here measures time: bench/speed.py does that.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops import FrozenBatchNorm2d

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.reference import StraightforwardContextBlock, straightforward_like, swap_context_blocks  # noqa: E402
from gczoo.blocks import ContextBlock, attention_pool  # noqa: E402
from gczoo.models.gc_resnet import Bottleneck, GCResNet  # noqa: E402

FUSIONS = ("add", "mul", "add+mul")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
TOL = dict(rtol=1e-5, atol=1e-5)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, including the zero-initialised last convs of GC transforms,
    and BatchNorm statistics far from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
            elif t.dim() == 1:  # norm weights
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / fan_in) ** 0.5)
    return model


def forward_backward(module: nn.Module, x: torch.Tensor, params_of: nn.Module = None):
    """Output, input gradient and gradients of the parameters of ``params_of`` (default
    ``module``) for the loss ``sum(out * w)`` with a fixed ``w``."""
    params_of = module if params_of is None else params_of
    x = x.detach().clone().requires_grad_(True)
    params_of.zero_grad(set_to_none=True)
    out = module(x)
    w = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * w).sum().backward()
    grads = {n: p.grad for n, p in params_of.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def close(actual, expected, what=""):
    """Equal to 1e-5, relative to the element and to the tensor's largest magnitude (at least 1)."""
    atol = TOL["atol"] * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=TOL["rtol"], atol=atol, msg=lambda m: f"{what}: {m}")


def assert_same(fast, ref):
    out_f, gx_f, g_f = fast
    out_r, gx_r, g_r = ref
    close(out_f, out_r, "output")
    close(gx_f, gx_r, "input gradient")
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        if name.endswith("conv_mask.bias"):
            # A shift of all logits leaves the softmax unchanged: this gradient is zero up to
            # rounding, whose size follows the gradient of the mask weight.
            scale = g_r[name[:-len("bias")] + "weight"].abs().max()
            assert g_f[name].abs().max() <= TOL["atol"] * scale and g_r[name].abs().max() <= TOL["atol"] * scale
        else:
            close(g_f[name], g_r[name], f"gradient of {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("pooling", ("att", "avg"))
def test_context_block_matches_straightforward(pooling, fusion, layout):
    block = randomize(ContextBlock(64, ratio=1 / 4, pooling=pooling, fusion=fusion))
    ref = straightforward_like(block)
    assert isinstance(ref, StraightforwardContextBlock)
    x = torch.randn(3, 64, 9, 7).to(memory_format=LAYOUTS[layout])
    assert_same(forward_backward(block, x), forward_backward(ref, x))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_pool_hand_written_backward(layout):
    """With gradients recorded the pooling runs as _AttentionPool (one map-sized gradient
    instead of autograd's two and their sum); its backward passes gradcheck in fp64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 5, 4, dtype=torch.double, generator=g).to(memory_format=LAYOUTS[layout]).requires_grad_()
    w = torch.randn(1, 8, 1, 1, dtype=torch.double, generator=g, requires_grad=True)
    b = torch.randn(1, dtype=torch.double, generator=g, requires_grad=True)
    assert type(attention_pool(x, w, b).grad_fn).__name__ == "_AttentionPoolBackward"
    assert torch.autograd.gradcheck(attention_pool, (x, w, b))
    with torch.no_grad():
        assert attention_pool(x, w, b).grad_fn is None


def _bottleneck_pair(norm_layer, fusion, pooling="att"):
    fast = Bottleneck(64, 16, context_block=ContextBlock(64, ratio=1 / 4, pooling=pooling, fusion=fusion),
                      norm_layer=norm_layer)
    randomize(fast)
    ref = copy.deepcopy(fast)
    ref.context_block = straightforward_like(fast.context_block)
    return fast, ref


def _count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


#: Map sizes for which the folded context is read from conv3's input (large maps) or from
#: its output (maps so small that reading conv3's weight costs more).
FOLD_SOURCES = {"from_conv3_input": (11, 10), "from_conv3_output": (2, 3)}


@pytest.mark.parametrize("source", FOLD_SOURCES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("norm", ("bn", "frozen_bn"))
def test_bottleneck_eval_fold_is_exact(norm, fusion, layout, source):
    """In eval mode the context is computed through bn3 folded into an affine map (the GC
    block's own forward is never called), with the same outputs and gradients as bn3 followed
    by the straightforward block."""
    fast, ref = _bottleneck_pair(nn.BatchNorm2d if norm == "bn" else FrozenBatchNorm2d, fusion)
    fast.eval(), ref.eval()
    gc_calls = _count_calls(fast.context_block)
    x = torch.randn(2, 64, *FOLD_SOURCES[source]).to(memory_format=LAYOUTS[layout])
    assert_same(forward_backward(fast, x), forward_backward(ref, x))
    assert not gc_calls, "the eval-mode fold was not taken"


@pytest.mark.parametrize("source", FOLD_SOURCES)
def test_bottleneck_eval_fold_keeps_identity_blocks_bit_exact(source):
    """A GC block with a zero transform leaves the bottleneck's output bit for bit unchanged
    on the fold route too (GC-ready checkpoints give exactly their source ResNet's logits)."""
    fast, _ = _bottleneck_pair(nn.BatchNorm2d, "add")
    fast.context_block.reset_parameters()
    plain = copy.deepcopy(fast)
    plain.context_block = None
    fast.eval(), plain.eval()
    gc_calls = _count_calls(fast.context_block)
    x = torch.randn(2, 64, *FOLD_SOURCES[source])
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
    assert not gc_calls


@pytest.mark.parametrize("pooling", ("att", "avg"))
def test_bottleneck_fold_avg_pooling(pooling):
    fast, ref = _bottleneck_pair(nn.BatchNorm2d, "add", pooling)
    fast.eval(), ref.eval()
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        close(fast(x), ref(x))


def test_bottleneck_plain_route_when_fold_is_not_exact():
    """Training mode, BatchNorm without running stats and a norm layer that is not a plain
    BatchNorm (here a subclass) run the GC block on bn3's output -- and still match the reference."""
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    cases = [(nn.BatchNorm2d, True), (lambda c: nn.BatchNorm2d(c, track_running_stats=False), False),
             (ScaledBN, False), (lambda c: nn.GroupNorm(4, c), False)]
    for norm_layer, train in cases:
        fast, ref = _bottleneck_pair(norm_layer, "add+mul")
        fast.train(train), ref.train(train)
        gc_calls = _count_calls(fast.context_block)
        x = torch.randn(4, 64, 6, 6)
        assert_same(forward_backward(fast, x), forward_backward(ref, x))
        assert gc_calls, f"{norm_layer} train={train}: bn3 was folded although the fold is not exact"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_matches_straightforward(layout):
    """A whole GC-ResNet (GC in c3-c5 plus a GC pre-block in c4) in training mode (which also
    updates the BatchNorm statistics) and then in eval mode, against the same network built
    with the straightforward block; the state dicts are interchangeable.

    fp32 outputs agree to 1e-5. Gradients are compared in fp64: through a whole network in
    training mode, fp32 rounding can flip a ReLU or a max-pool tie, which moves an input
    gradient by far more than 1e-5 for any two formulations; in fp64 everything agrees to 1e-10.
    """
    fmt = LAYOUTS[layout]
    fast = randomize(GCResNet((1, 2, 2, 1), num_classes=10, stage_blocks={"c4": "gc"}))
    ref = swap_context_blocks(copy.deepcopy(fast), straightforward_like)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    fast64, ref64 = copy.deepcopy(fast).double(), copy.deepcopy(ref).double()
    fast, ref, x = fast.to(memory_format=fmt), ref.to(memory_format=fmt), x.to(memory_format=fmt)
    for train in (True, False):
        fast.train(train), ref.train(train)
        with torch.no_grad():
            close(fast(x), ref(x), f"fp32 output, train={train}")
        fast64.train(train), ref64.train(train)
        out, gx, grads = forward_backward(fast64, x.double())
        out_r, gx_r, grads_r = forward_backward(ref64, x.double())
        torch.testing.assert_close(out, out_r, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(gx, gx_r, rtol=1e-10, atol=1e-10)
        assert grads.keys() == grads_r.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], grads_r[name], rtol=1e-10, atol=1e-10, msg=name)
    for name, t in ref.state_dict().items():  # BN running stats were updated alike in training mode
        close(fast.state_dict()[name], t, name)


class OpLog(TorchDispatchMode):
    """Records ``(op name, input tensors, output tensors)`` of every aten op."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, flat_in, flat_out))
        return out


COPY_OPS = {"clone", "_to_copy", "copy_", "contiguous", "_reshape_alias_copy", "view_copy"}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
def test_no_copies_of_feature_maps(layout, train):
    """Neither the GC block nor the GC bottleneck copies a feature map (C x H x W sized tensor) in
    either memory format, and the output keeps the input's memory format. In training that holds
    for the backward pass too: the block's output is no view, so the bottleneck's in-place residual
    add and ReLU on it do not make autograd copy the map and its gradient (``CopySlices``)."""
    fmt = LAYOUTS[layout]
    block = randomize(Bottleneck(64, 16, context_block=ContextBlock(64, ratio=1 / 4, fusion="add+mul"))).train(train)
    block = block.to(memory_format=fmt)
    x = torch.randn(2, 64, 12, 12).to(memory_format=fmt)
    for module, inp in ((block, x), (block.context_block, x)):
        with torch.no_grad(), OpLog() as log:
            out = module(inp)
        assert out.is_contiguous(memory_format=fmt)
        if train:
            leaf = inp.clone().requires_grad_()
            with OpLog() as backward_log:  # autograd.grad: no .grad accumulation, which copies
                torch.autograd.grad(module(leaf).sum(), [leaf, *module.parameters()])
            log.calls += backward_log.calls
        copies = [name for name, ins, _ in log.calls if name in COPY_OPS and any(t.numel() >= 16 * 12 * 12 for t in ins)]
        assert not copies, f"feature maps copied by {copies}"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
def test_autocast_softmax_in_fp32(dtype, train):
    """Under autocast the block runs in the low-precision dtype, its softmax in fp32, and it
    stays close to the fp32 result."""
    block = randomize(Bottleneck(64, 16, context_block=ContextBlock(64, ratio=1 / 4))).train(train)
    x = torch.randn(2, 64, 10, 10)
    with torch.no_grad():
        expected = copy.deepcopy(block)(x)
        with torch.autocast("cpu", dtype=dtype), OpLog() as log:
            out = block(x)
    softmaxes = [outs for name, _, outs in log.calls if "softmax" in name]
    assert softmaxes, "no softmax ran"
    assert all(o.dtype == torch.float32 for outs in softmaxes for o in outs)
    assert any(name in ("convolution", "mkldnn_convolution") and outs[0].dtype == dtype
               for name, _, outs in log.calls)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())


@pytest.mark.parametrize("train", (False, True), ids=("eval", "train"))
def test_compiles_without_graph_breaks(train):
    """torch.compile(fullgraph=True) traces a whole GC-ResNet (any graph break raises) and gives
    eager's outputs; the eager backend keeps this cheap on CPU while exercising the same dynamo
    tracing. The NCHW input takes the pooling route that only compiled graphs take (the
    ``(B, Np, C)`` view), training the channels-last one."""
    torch._dynamo.reset()
    model = randomize(GCResNet((1, 1, 1, 1), num_classes=10, gc_fusion="add+mul")).train(train)
    x = torch.randn(2, 3, 32, 32)
    if train:
        x = x.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="aot_eager" if train else "eager", fullgraph=True)
    if train:
        expected = forward_backward(copy.deepcopy(model), x)
        assert_same(forward_backward(compiled, x, params_of=model), expected)
    else:
        with torch.no_grad():
            close(compiled(x), model(x))


def test_benchmark_script_measures_every_model(capsys):
    """bench/speed.py runs end to end (tiny inputs, two rounds, inference and training) and
    prints one row per model and mode, with ratios to resnet50 and to the GC-free body; no
    timing is asserted."""
    from bench import speed

    speed.main(["--size", "32", "--batch", "2", "--rounds", "2", "--warmup", "1", "--mode", "both"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| infer") or line.startswith("| train")]
    assert sorted((r[0].strip("| "), r[2]) for r in rows) == sorted(
        (mode, name) for mode in ("infer", "train") for name in speed.MODELS)
    for r in rows:
        if r[2] == "resnet50":
            assert r[4] == "1.000"
        if r[2] == "gczoo_body":
            assert r[6].strip(" |") == "1.000"
    assert "torch threads:" in out and "batch 2, 32x32, NCHW" in out
