"""Training precision of spark-pretrain: fp32, or autocast to bf16/fp16 with float32 parameters.

"auto" picks bf16 where the hardware computes it natively (CUDA compute capability 8.0 and newer; CPUs
with AVX512-BF16 or AMX-BF16), else fp32. fp16 is for CUDA only and runs with a gradient scaler (its
state is checkpointed). Under autocast, convs and linears run in the low precision, the masked norms
keep float32 statistics and parameters, and the loss is float32.

On a CPU where oneDNN takes no bf16 at all (AVX2 without AVX512-BW: `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
is false), PyTorch runs bf16 convolutions through generic kernels (`slow_conv2d`: im2col + GEMM, with column
buffers of the whole batch) and bf16 linears through an unvectorized GEMM, many times slower than in float32.
There the bf16 context also computes convs and linears in float32 on their bf16-rounded inputs and weights
(Float32Compute): the values are those of bf16 autocast (bf16 operands, float32 accumulation, a bf16 output),
the tensors kept for backward the same bf16 ones, only the arithmetic is done by oneDNN's float32 kernels.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device, flags: Optional[set] = None) -> Tuple[bool, str]:
    """Whether the device computes bfloat16 natively, and the evidence, in words."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA compute capability {major}.{minor}"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU flags {', '.join(found)}"
    return False, f"no {' or '.join(CPU_BF16_FLAGS)} among the CPU flags" if flags else "CPU flags unknown"


def resolve(requested: str, device: torch.device, flags: Optional[set] = None) -> Tuple[str, str]:
    """(precision to use, why): "auto" resolved for the device; an impossible request raises ValueError."""
    if requested not in CHOICES:
        raise ValueError(f"--precision must be one of {CHOICES}, got {requested!r}")
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (on CPUs use bf16 or fp32)")
    if requested in ("fp32", "fp16"):
        return requested, "requested"
    native, evidence = native_bf16(device, flags)
    if requested == "bf16":
        # Said at start, since nothing else would tell: bf16 saves memory here, not time.
        if native:
            return "bf16", "requested"
        if device.type == "cuda":
            how = "bf16 kernels without bf16 tensor cores"
        elif onednn_takes_bf16():
            how = "oneDNN's bf16 kernels without native bf16 instructions"
        else:
            how = "convolutions and linears compute in float32 on bf16 values (Float32Compute)"
        return "bf16", f"requested, though bf16 is not native here ({evidence}): {how}, no faster than fp32"
    return ("bf16", f"auto: bf16 is native here ({evidence})") if native else \
        ("fp32", f"auto: bf16 is not native here ({evidence})")


def onednn_takes_bf16() -> bool:
    """Whether PyTorch's CPU convolutions and linears have bf16 kernels here (oneDNN's: native bf16, or AVX512)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the query
        return False


def autocast(precision: str, device: torch.device):
    """The context a training step's forward pass runs in."""
    if precision == "fp32":
        return contextlib.nullcontext()
    context = contextlib.ExitStack()
    context.enter_context(torch.autocast(device.type, dtype=DTYPES[precision]))
    if device.type == "cpu" and precision == "bf16" and not onednn_takes_bf16():
        context.enter_context(Float32Compute())
    return context


_BF16 = torch.bfloat16


def _cpu_bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == _BF16


def _rounded(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t rounded to bf16, as autocast casts an operand (None stays None)."""
    return None if t is None else t.to(_BF16)


# A convolution's float32 copies are made a slice of the batch at a time, each at most this large (at least one
# image): whole-batch float32 copies of the decoder's last activations (48 x 224² at batch 16: 154 MB each), and
# oneDNN's buffers for them, are live at once in its backward, where a bf16 step peaks. Fused bf16 step, batch 16,
# peak RSS: resnet50 3.53 GB unsliced, 3.32-3.37 GB in 32 MB slices, 3.24 GB in 8 MB (one image), at the same step
# time; convnext_tiny 3.53 / 3.36 / 3.29 GB.
FLOAT32_SLICE_BYTES = 8 << 20


def _batch_slices(t: torch.Tensor) -> List[slice]:
    """Slices of t's batch of at most FLOAT32_SLICE_BYTES of float32 each (at least one item; one empty slice for
    an empty batch)."""
    per_slice = max(1, FLOAT32_SLICE_BYTES // (4 * max(1, t[0].numel()))) if len(t) else 1
    return [slice(i, i + per_slice) for i in range(0, len(t), per_slice)] or [slice(0, 0)]


def _empty_batch(part: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized (n, ...) tensor of part's item shape and memory layout."""
    channels_last = part.dim() == 4 and not part.is_contiguous() and part.is_contiguous(
        memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, *part.shape[1:]), dtype=dtype, memory_format=layout)


class _ConvolutionInFloat32(torch.autograd.Function):
    """aten.convolution under bf16 autocast, computed in float32 on the bf16-rounded operands, a slice of the batch
    at a time (FLOAT32_SLICE_BYTES); keeps the bf16 input and weight for backward, as autocast's bf16 convolution
    does."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        xb, wb, bb = _rounded(x), _rounded(weight), _rounded(bias)
        args = (stride, padding, dilation, transposed, output_padding, groups)
        w32, b32 = wb.float(), None if bb is None else bb.float()
        y = None
        with torch.autocast("cpu", enabled=False):
            for part_slice in _batch_slices(xb):
                part = torch.ops.aten.convolution(xb[part_slice].float(), w32, b32, *args)
                if y is None:
                    y = _empty_batch(part, len(xb), _BF16)
                y[part_slice] = part
        ctx.save_for_backward(xb, wb)
        ctx.args = args
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], b_dtype is not None and ctx.needs_input_grad[2]]
        bias_sizes = [grad.shape[1]] if b_dtype is not None else None
        w32 = wb.float()
        gx = _empty_batch(xb, len(xb), x_dtype) if mask[0] else None
        gw = torch.zeros(wb.shape) if mask[1] else None
        gb = torch.zeros(grad.shape[1]) if mask[2] else None
        for part_slice in _batch_slices(xb):
            part_gx, part_gw, part_gb = torch.ops.aten.convolution_backward(
                grad[part_slice].float(), xb[part_slice].float(), w32, bias_sizes, *ctx.args, mask)
            if gx is not None:
                gx[part_slice] = part_gx
            if gw is not None:
                gw += part_gw
            if gb is not None:
                gb += part_gb
        return (gx, None if gw is None else gw.to(w_dtype), None if gb is None else gb.to(b_dtype),
                None, None, None, None, None, None)


class _LinearInFloat32(torch.autograd.Function):
    """F.linear under bf16 autocast, computed in float32 on the bf16-rounded operands (see _ConvolutionInFloat32)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb, bb = _rounded(x), _rounded(weight), _rounded(bias)
        with torch.autocast("cpu", enabled=False):
            y = F.linear(xb.float(), wb.float(), None if bb is None else bb.float())
        ctx.save_for_backward(xb, wb)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.to(_BF16)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.float()
        gx = (g @ wb.float()).to(x_dtype) if ctx.needs_input_grad[0] else None
        rows = g.reshape(-1, g.shape[-1])
        gw = (rows.t() @ xb.float().reshape(-1, xb.shape[-1])).to(w_dtype) if ctx.needs_input_grad[1] else None
        gb = rows.sum(0).to(b_dtype) if b_dtype is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _bound(args: Sequence, kwargs: dict, names: Sequence[str], defaults: dict) -> dict:
    """The call's arguments by name (a functional's positional order in `names`)."""
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


# The functionals Float32Compute takes: their parameters in positional order, and the defaults.
_SIGNATURES = {
    torch.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    torch.conv_transpose2d: ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    F.linear: ("input", "weight", "bias"),
}
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "dilation": 1, "groups": 1}


class Float32Compute(TorchFunctionMode):
    """Under CPU bf16 autocast, 2-d convolutions, transposed convolutions and linears on CPU tensors computed in
    float32 on their bf16-rounded operands (the module docstring says why and where). Anything else, and a conv with
    string padding ("same"), goes to PyTorch unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names = _SIGNATURES.get(func)
        # A call with arguments the functional does not take goes to PyTorch, which says so.
        if names and len(args) <= len(names) and set(kwargs) <= set(names) and _cpu_bf16_autocast():
            a = _bound(args, kwargs, names, _DEFAULTS)
            x, weight, bias = a["input"], a["weight"], a["bias"]
            operands = [t for t in (x, weight, bias) if t is not None]
            if all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.is_floating_point() for t in operands):
                if func is F.linear:
                    return _LinearInFloat32.apply(x, weight, bias)
                if x.dim() == 4 and not isinstance(a["padding"], str):
                    pairs = [list(_pair(a[name])) for name in ("stride", "padding", "dilation", "output_padding")]
                    return _ConvolutionInFloat32.apply(x, weight, bias, *pairs[:3], func is torch.conv_transpose2d,
                                                       pairs[3], a["groups"])
        return func(*args, **kwargs)


def grad_scaler(precision: str, device: torch.device) -> Optional["torch.amp.GradScaler"]:
    """A gradient scaler for fp16 (whose small range underflows gradients), else None."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
