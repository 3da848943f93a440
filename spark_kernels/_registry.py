"""The op registry: every op of spark_kernels, declared once.

An entry (OpSpec) holds what the rest of the package and the tests derive from it:
  * the public function's name and the backend primitives it is built from (Primitive: the attribute a
    backend's kernels object has, the C++ op that implements it and its schema, the Triton module that
    implements it, its fake (meta) implementation for torch.compile, sample arguments for opcheck);
  * what each backend supports of it (Support: dtypes, kernel sizes, strides, layouts, channel limits,
    each with its reason), which the dispatcher (_backends.select_backend) reads before choosing;
  * its test cases (Variant: inputs and a call, the benchmark's name for it).

Derived from here: the native and Triton loaders (_native, triton.load), the fake registrations, the
Triton compile-check list, the hostile-input / determinism / opcheck parametrizations of the tests,
tests/helpers.OP_PRIMITIVES and the benchmark's op list. Adding an op is one entry here plus its kernels
(docs/design.md, "Adding an op").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ._layout import accumulation_dtype, kernel_memory_format, uses_rows

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("planes", "rows")  # spark_kernels/_layout.py

# Depthwise conv geometry the kernels are written for (every backend; csrc/common/dispatch.h for C++).
DWCONV_KERNEL_SIZES = (3, 5, 7)
DWCONV_STRIDES = (1, 2)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- what a backend supports ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Limit:
    """The values a backend takes for one property of a call, and why no others."""
    values: Tuple
    why: str


@dataclass(frozen=True)
class Call:
    """The properties of one call that support depends on (None: not applicable or unknown, not checked)."""
    dtype: torch.dtype
    layout: Optional[str] = None
    channels: Optional[int] = None
    kernel_size: Optional[int] = None
    stride: Optional[int] = None

    @classmethod
    def of(cls, x: torch.Tensor, kernel_size: Optional[int] = None, stride: Optional[int] = None) -> "Call":
        """x: the logically (N, C, H, W) input (a channels_last LayerNorm input as its NCHW view)."""
        if x.dim() != 4:
            return cls(x.dtype, kernel_size=kernel_size, stride=stride)
        return cls(x.dtype, "rows" if uses_rows(x) else "planes", x.shape[1], kernel_size, stride)


@dataclass(frozen=True)
class Support:
    """What one backend supports of one op. Every limit carries its reason; devices are the backend's own
    (_backends.Backend: where it runs at all), unless `devices` narrows them for this op."""
    dtypes: Limit
    kernel_sizes: Optional[Limit] = None
    strides: Optional[Limit] = None
    layouts: Limit = Limit(LAYOUTS, "both kernel layouts are implemented")
    max_channels: Optional[Limit] = None  # values = (the largest channel count,)
    devices: Optional[Limit] = None

    def reasons(self, call: Call, device_type: Optional[str] = None) -> List[str]:
        """Why this backend cannot take the call (empty when it can)."""
        out = []

        def check(value, limit: Optional[Limit], what: str):
            if value is not None and limit is not None and value not in limit.values:
                shown = ", ".join(dtype_name(v) if isinstance(v, torch.dtype) else str(v) for v in limit.values)
                shown_value = dtype_name(value) if isinstance(value, torch.dtype) else value
                out.append(f"supports {what} {shown}, not {shown_value} ({limit.why})")

        check(device_type, self.devices, "devices")
        check(call.dtype, self.dtypes, "dtypes")
        check(call.kernel_size, self.kernel_sizes, "kernel sizes")
        check(call.stride, self.strides, "strides")
        check(call.layout, self.layouts, "layouts")
        if call.channels is not None and self.max_channels is not None and call.channels > self.max_channels.values[0]:
            out.append(f"supports at most {self.max_channels.values[0]} channels, got {call.channels} "
                       f"({self.max_channels.why})")
        return out


# -- primitives: the kernels a backend provides ------------------------------------------------------------
def _dense_like(x):
    return torch.empty_like(x, memory_format=kernel_memory_format(x))


def dwconv_output_shape(x: torch.Tensor, stride: int) -> Tuple[int, int, int, int]:
    """nn.Conv2d's output shape for padding k//2 (odd k): (N, C, ceil(H / stride), ceil(W / stride))."""
    n, c, h, w = x.shape
    return (n, c, -(-h // stride), -(-w // stride))


def _fake_dwconv_forward(x, weight, bias, index, neighbors, stride=1):
    return x.new_empty(dwconv_output_shape(x, stride)).contiguous(memory_format=kernel_memory_format(x))


def _fake_dwconv_backward(grad_out, x, weight, index, neighbors, stride=1, input_index=None, input_taps=None):
    return _dense_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _fake_channel_stats(x, index, *rest):
    return x.new_empty((2, x.shape[1]), dtype=torch.float64)


def _fake_bn_elemt(x, index, scale, shift):
    return _dense_like(x)


def _dense_grad_like(grad_out, x):
    """A backward op's dense output: in x's kernel layout, or channels_last when x is given as the (M, C) rows of
    the active sites (csrc/norm_ops.h, prepare_backward)."""
    if x.dim() == 2:
        return torch.empty_like(grad_out, memory_format=torch.channels_last)
    return _dense_like(x)


def _fake_bn_backward_elemt(grad_out, x, index, a, b, d):
    return _dense_grad_like(grad_out, x)


def _fake_bn_train_forward(x, index, weight, bias, running_mean, running_var, momentum, eps):
    c = x.shape[1]
    return (torch.empty_like(x, memory_format=torch.channels_last), x.new_empty((index.shape[0], c)),
            x.new_empty((c,), dtype=torch.float64), x.new_empty((c,), dtype=torch.float64))


def _fake_bn_train_backward(grad_out, x, index, weight, mean, invstd):
    c = grad_out.shape[1]
    param_dtype = torch.float64 if weight is None else weight.dtype
    return (_dense_grad_like(grad_out, x), grad_out.new_empty((c,), dtype=param_dtype),
            grad_out.new_empty((c,), dtype=param_dtype))


def _fake_ln_forward(x, index, weight, bias, eps):
    acc, m = accumulation_dtype(x.dtype), index.shape[0]
    return _dense_like(x), x.new_empty((m,), dtype=acc), x.new_empty((m,), dtype=acc)


def _fake_ln_backward(grad_out, x, index, weight, mean, rstd):
    acc, c = accumulation_dtype(x.dtype), x.shape[1]
    return _dense_like(x), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)


def _fake_image_channel_stats(x, index, *rest):
    return x.new_empty((x.shape[0], 2, x.shape[1]), dtype=torch.float64)


def _fake_gn_elemt(x, index, center, scale, shift):
    return _dense_like(x)


def _fake_gn_backward_elemt(grad_out, x, index, center, a, b, d):
    return _dense_grad_like(grad_out, x)


@dataclass(frozen=True)
class SampleTensors:
    """Tensors from which every primitive's sample arguments are taken (opcheck, tracing checks): x and
    grad (N, C, H, W), a (C, 1, k, k) weight and (C,) bias of x's dtype, per-channel and per-site float
    vectors in the accumulation dtype, and the site tables."""
    x: torch.Tensor
    grad: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    vec: torch.Tensor
    site_vec: torch.Tensor
    index: torch.Tensor
    neighbors: torch.Tensor


@dataclass(frozen=True)
class Primitive:
    """One backend primitive: `name` on a backend's kernels object (and spark_kernels::triton_<name>), the
    C++ op spark_kernels::<native> with its schema, the module of spark_kernels/triton that implements it
    (None: a C++ op of one backend only, CPU_TRAINING_OPS)."""
    name: str
    native: str
    schema: str
    triton_module: Optional[str]
    fake: Callable
    sample: Callable[[SampleTensors], tuple]


# -- test cases ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of calling an op that the tests cover (and the benchmark times when bench_name is set):
    inputs(n, c, h, w, dtype, generator) -> dict of tensors (x in the call's logical layout);
    call(tensors, active, backend) -> the output."""
    id: str
    inputs: Callable[..., Dict[str, torch.Tensor]]
    call: Callable[..., torch.Tensor]
    kernel_size: Optional[int] = None
    stride: Optional[int] = None
    bench_name: Optional[str] = None
    channels_last_input: bool = False  # x is (N, H, W, C)


@dataclass(frozen=True)
class OpSpec:
    name: str             # the public function, spark_kernels.<name>
    short: str            # the op's key in test parametrizations
    primitives: Tuple[Primitive, ...]
    support: Dict[str, Support]  # backend name -> what it supports
    variants: Tuple[Variant, ...] = field(default=())

    def kernel_sizes(self) -> Tuple[int, ...]:
        """Every kernel size some backend supports (the public function accepts these)."""
        sizes = {k for s in self.support.values() if s.kernel_sizes for k in s.kernel_sizes.values}
        return tuple(sorted(sizes))

    def strides(self) -> Tuple[int, ...]:
        return tuple(sorted({k for s in self.support.values() if s.strides for k in s.strides.values}))


def _randn(g, dtype, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _conv_inputs(k):
    return lambda n, c, h, w, dtype, g: dict(x=_randn(g, dtype, n, c, h, w), weight=_randn(g, dtype, c, 1, k, k),
                                              bias=_randn(g, dtype, c))


def _conv_call(stride):
    def call(t, active, backend):
        import spark_kernels as sk
        return sk.sparse_depthwise_conv2d(t["x"], t["weight"], t.get("bias"), active, stride=stride, backend=backend)
    return call


def _bn_inputs(n, c, h, w, dtype, g):
    x, weight, bias, running_mean = (_randn(g, dtype, n, c, h, w), _randn(g, dtype, c), _randn(g, dtype, c),
                                     _randn(g, dtype, c))
    running_var = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return dict(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)


def _bn_call(training):
    def call(t, active, backend):
        import spark_kernels as sk
        return sk.masked_batch_norm(t["x"], active, t.get("running_mean"), t.get("running_var"), t.get("weight"),
                                    t.get("bias"), training=training, momentum=0.3, backend=backend)
    return call


def _ln_inputs(channels_last):
    def inputs(n, c, h, w, dtype, g):
        x = _randn(g, dtype, n, c, h, w)
        return dict(x=x.permute(0, 2, 3, 1).contiguous() if channels_last else x, weight=_randn(g, dtype, c),
                    bias=_randn(g, dtype, c))
    return inputs


def _ln_call(data_format):
    def call(t, active, backend):
        import spark_kernels as sk
        return sk.masked_layer_norm(t["x"], active, t.get("weight"), t.get("bias"), eps=1e-6,
                                    data_format=data_format, backend=backend)
    return call


# GroupNorm's test and benchmark cases use 32 groups (timm's default), fewer where C has fewer.
GROUP_NORM_CASE_GROUPS = 32


def group_norm_case_groups(channels: int) -> int:
    return math.gcd(GROUP_NORM_CASE_GROUPS, channels)


def _gn_inputs(n, c, h, w, dtype, g):
    return dict(x=_randn(g, dtype, n, c, h, w), weight=_randn(g, dtype, c), bias=_randn(g, dtype, c))


def _gn_call(t, active, backend):
    import spark_kernels as sk
    return sk.masked_group_norm(t["x"], active, group_norm_case_groups(t["x"].shape[1]), t.get("weight"),
                                t.get("bias"), backend=backend)


def _image_table(t: "SampleTensors") -> torch.Tensor:
    """A (N, C) per-(image, channel) coefficient table in the accumulation dtype."""
    return t.vec.repeat(t.x.shape[0], 1)


# -- the ops -----------------------------------------------------------------------------------------------
_GPU_DTYPES_WHY = "the GPU kernels are built for 16- and 32-bit inputs with float32 accumulation"
_NATIVE_CPU = Limit(FLOATS, "every floating dtype is instantiated")
_CUDA = Limit(GPU_FLOATS, _GPU_DTYPES_WHY)
_TRITON = Limit(GPU_FLOATS, _GPU_DTYPES_WHY)
_REFERENCE = Limit(FLOATS, "PyTorch's dense ops")


def _conv_support(dtypes: Limit) -> Support:
    return Support(dtypes, kernel_sizes=Limit(DWCONV_KERNEL_SIZES, "the kernels are instantiated per kernel size"),
                   strides=Limit(DWCONV_STRIDES, "the site tables of ActiveSites.strided_neighbors and "
                                                 "transposed_taps are built for these strides"))


def _triton_ln_max_channels() -> Limit:
    from .triton.config import LN_MAX_CHANNELS  # plain Python: importable without triton
    return Limit((LN_MAX_CHANNELS,), "a Triton LayerNorm tile holds all channels of a site "
                                     "(spark_kernels/triton/config.py)")


DWCONV = OpSpec(
    name="sparse_depthwise_conv2d", short="conv",
    primitives=(
        # y (N, C, ceil(H/stride), ceil(W/stride)); index: the active OUTPUT sites (numbered in y's grid),
        # neighbors: for each, the x site read by each tap or -1 (ActiveSites.strided_neighbors).
        Primitive("dwconv_forward", "dwconv_forward",
                  "(Tensor x, Tensor weight, Tensor? bias, Tensor index, Tensor neighbors, int stride=1) -> Tensor",
                  "dwconv", _fake_dwconv_forward, lambda t: (t.x, t.weight, t.bias, t.index, t.neighbors)),
        # At stride 2, input_index (x's active sites) and input_taps (ActiveSites.transposed_taps: the output
        # site whose tap t reads each, or -1) give the input gradient; at stride 1 they are None (the
        # mirrored neighbors do).
        Primitive("dwconv_backward", "dwconv_backward",
                  "(Tensor grad_out, Tensor x, Tensor weight, Tensor index, Tensor neighbors, int stride=1, "
                  "Tensor? input_index=None, Tensor? input_taps=None) -> (Tensor, Tensor, Tensor)", "dwconv",
                  _fake_dwconv_backward, lambda t: (t.grad, t.x, t.weight, t.index, t.neighbors)),
    ),
    support={"reference": _conv_support(_REFERENCE), "cpu": _conv_support(_NATIVE_CPU),
             "cuda": _conv_support(_CUDA), "triton": _conv_support(_TRITON)},
    # Stride 1 at every kernel size; stride 2 at 3x3 and 5x5, the strided depthwise convs of MobileNets and
    # EfficientNets (the tables, not the kernel size, make the difference).
    variants=tuple(Variant(f"conv{k}", _conv_inputs(k), _conv_call(1), kernel_size=k, stride=1, bench_name=f"dwconv{k}")
                   for k in DWCONV_KERNEL_SIZES)
    + tuple(Variant(f"conv{k}s2", _conv_inputs(k), _conv_call(2), kernel_size=k, stride=2, bench_name=f"dwconv{k}s2")
            for k in (3, 5)),
)

BATCH_NORM = OpSpec(
    name="masked_batch_norm", short="batch_norm",
    primitives=(
        Primitive("bn_stats", "masked_bn_stats", "(Tensor x, Tensor index) -> Tensor", "batch_norm",
                  _fake_channel_stats, lambda t: (t.x, t.index)),
        Primitive("bn_elemt", "masked_bn_elemt", "(Tensor x, Tensor index, Tensor scale, Tensor shift) -> Tensor",
                  "batch_norm", _fake_bn_elemt, lambda t: (t.x, t.index, t.vec, t.vec + 1)),
        Primitive("bn_backward_stats", "masked_bn_backward_stats",
                  "(Tensor grad_out, Tensor x, Tensor index, Tensor mean) -> Tensor", "batch_norm",
                  _fake_channel_stats, lambda t: (t.grad, t.x, t.index, t.vec)),
        Primitive("bn_backward_elemt", "masked_bn_backward_elemt",
                  "(Tensor grad_out, Tensor x, Tensor index, Tensor a, Tensor b, Tensor d) -> Tensor", "batch_norm",
                  _fake_bn_backward_elemt, lambda t: (t.grad, t.x, t.index, t.vec, t.vec + 1, t.vec - 1)),
    ),
    support={"reference": Support(_REFERENCE), "cpu": Support(_NATIVE_CPU), "cuda": Support(_CUDA),
             "triton": Support(_TRITON)},
    variants=(Variant("bn_train", _bn_inputs, _bn_call(True), bench_name="batch_norm"),
              Variant("bn_eval", _bn_inputs, _bn_call(False))),
)

# Masked BatchNorm's training forward and backward as one C++ op each, CPU only (csrc/cpu/batch_norm.cpp): the
# staged primitives above plus the float64 per-channel arithmetic that spark_kernels/batch_norm.py otherwise does
# between them, without a Python round trip per stage. The cpu backend's kernels carry them (spark_kernels/_native.py)
# and masked_batch_norm uses them for a channels_last x without a process group. Not primitives: no other backend
# implements them. Forward updates the running statistics in place; backward takes x as the rows forward returned
# and gives the parameter gradients in weight's dtype (float64 without a weight).
CPU_TRAINING_OPS: Tuple[Primitive, ...] = (
    Primitive("bn_train_forward", "masked_bn_train_forward",
              "(Tensor x, Tensor index, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
              "Tensor(b!)? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor)", None,
              _fake_bn_train_forward,
              lambda t: (t.x, t.index, t.vec, t.vec + 1, t.vec.clone(), t.vec.abs() + 1, 0.1, 1e-5)),
    Primitive("bn_train_backward", "masked_bn_train_backward",
              "(Tensor grad_out, Tensor x, Tensor index, Tensor? weight, Tensor mean, Tensor invstd)"
              " -> (Tensor, Tensor, Tensor)", None, _fake_bn_train_backward,
              lambda t: (t.grad, t.x, t.index, t.vec, t.vec.double(), t.vec.double().abs() + 1)),
)

LAYER_NORM = OpSpec(
    name="masked_layer_norm", short="layer_norm",
    primitives=(
        Primitive("ln_forward", "masked_ln_forward",
                  "(Tensor x, Tensor index, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
                  "layer_norm", _fake_ln_forward, lambda t: (t.x, t.index, t.vec, None, 1e-6)),
        Primitive("ln_backward", "masked_ln_backward",
                  "(Tensor grad_out, Tensor x, Tensor index, Tensor? weight, Tensor mean, Tensor rstd)"
                  " -> (Tensor, Tensor, Tensor)", "layer_norm",
                  _fake_ln_backward, lambda t: (t.grad, t.x, t.index, t.vec, t.site_vec, t.site_vec.abs() + 0.5)),
    ),
    support={"reference": Support(_REFERENCE), "cpu": Support(_NATIVE_CPU), "cuda": Support(_CUDA),
             "triton": Support(_TRITON, max_channels=_triton_ln_max_channels())},
    variants=(Variant("ln_channels_first", _ln_inputs(False), _ln_call("channels_first"), bench_name="layer_norm_cf"),
              Variant("ln_channels_last", _ln_inputs(True), _ln_call("channels_last"), bench_name="layer_norm_cl",
                      channels_last_input=True)),
)

GROUP_NORM = OpSpec(
    name="masked_group_norm", short="group_norm",
    primitives=(
        Primitive("gn_stats", "masked_gn_stats", "(Tensor x, Tensor index) -> Tensor", "group_norm",
                  _fake_image_channel_stats, lambda t: (t.x, t.index)),
        Primitive("gn_elemt", "masked_gn_elemt",
                  "(Tensor x, Tensor index, Tensor center, Tensor scale, Tensor shift) -> Tensor", "group_norm",
                  _fake_gn_elemt, lambda t: (t.x, t.index, _image_table(t), _image_table(t) + 1, _image_table(t) - 1)),
        Primitive("gn_backward_stats", "masked_gn_backward_stats",
                  "(Tensor grad_out, Tensor x, Tensor index, Tensor center) -> Tensor", "group_norm",
                  _fake_image_channel_stats, lambda t: (t.grad, t.x, t.index, _image_table(t))),
        Primitive("gn_backward_elemt", "masked_gn_backward_elemt",
                  "(Tensor grad_out, Tensor x, Tensor index, Tensor center, Tensor a, Tensor b, Tensor d) -> Tensor",
                  "group_norm", _fake_gn_backward_elemt,
                  lambda t: (t.grad, t.x, t.index, _image_table(t), _image_table(t) + 1, _image_table(t) - 1,
                             _image_table(t) * 2)),
    ),
    support={"reference": Support(_REFERENCE), "cpu": Support(_NATIVE_CPU), "cuda": Support(_CUDA),
             "triton": Support(_TRITON)},
    variants=(Variant("gn", _gn_inputs, _gn_call, bench_name="group_norm"),),
)

OPS: Dict[str, OpSpec] = {op.name: op for op in (DWCONV, BATCH_NORM, LAYER_NORM, GROUP_NORM)}
PRIMITIVES: Tuple[Primitive, ...] = tuple(p for op in OPS.values() for p in op.primitives)
VARIANTS: Dict[str, Tuple[OpSpec, Variant]] = {v.id: (op, v) for op in OPS.values() for v in op.variants}


def get_op(name: str) -> OpSpec:
    if name not in OPS:
        raise KeyError(f"op {name!r} is not in the op registry (spark_kernels/_registry.py); known: {list(OPS)}")
    return OPS[name]


def primitive(name: str) -> Primitive:
    return next(p for p in PRIMITIVES if p.name == name)


def kernels_namespace(lookup: Callable[[Primitive], Callable]):
    """A backend's kernels object: each primitive's name bound to lookup(primitive)."""
    from types import SimpleNamespace
    return SimpleNamespace(**{p.name: lookup(p) for p in PRIMITIVES})


def sample_tensors(n: int, c: int, h: int, w: int, k: int, dtype: torch.dtype, device, rows: bool,
                   seed: int = 0) -> SampleTensors:
    """Real sample tensors for opcheck: x, grad in the given layout, site tables of a fixed mask."""
    from ._sites import ActiveSites
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dt)

    def dense():
        t = randn(n, c, h, w)
        return t.contiguous(memory_format=torch.channels_last) if rows else t

    mask = (torch.rand(n, 1, h, w, generator=g) > 0.4).to(device)
    mask.view(-1)[0] = True
    sites = ActiveSites(mask)
    acc = accumulation_dtype(dtype)
    return SampleTensors(dense(), dense(), randn(c, 1, k, k), randn(c), randn(c, dt=acc),
                         randn(sites.num_active, dt=acc), sites.index, sites.neighbors(k))
