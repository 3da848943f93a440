"""Shared test fixtures: masks, shapes and the tolerances of every comparison (one place)."""
from __future__ import annotations

import math

import torch

from spark_kernels._registry import OPS
from spark_kernels.masks import patch_mask, upsample_mask

# Error of a backend against a float64 evaluation of the reference must be within
# ERROR_MULTIPLE x (error of the reference itself in the same dtype) + ABS_FLOOR[dtype]
# (flash-attention's rule); float64 runs compare directly with these absolute/relative tolerances.
ERROR_MULTIPLE = 4.0
ABS_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ATOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
GRADCHECK = dict(eps=1e-6, atol=1e-5, rtol=1e-4)
# Model level (fused SparK vs reference SparK): per parameter, max |grad difference| must be within
# MODEL_GRAD_RTOL x max |reference grad| (summation order differs between the paths; float64 runs).
MODEL_GRAD_RTOL = {torch.float64: 1e-8, torch.float32: 1e-3}
# Model level under autocast (float16/bfloat16): the fused model's loss and gradient error against the float32
# reference must be within ERROR_MULTIPLE x the reference's own error under the same autocast, plus
# AUTOCAST_FLOOR x the float32 value (relative L2 norm over all parameter gradients).
AUTOCAST_FLOOR = 1e-3


def random_mask(n: int, h: int, w: int, ratio: float, seed: int = 0) -> torch.Tensor:
    """Bool (n, 1, h, w) mask with each site masked (False) with probability `ratio`."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g) >= ratio


def patch_mask_with_both(n: int, gh: int, gw: int, seed: int = 1) -> torch.Tensor:
    """A fixed bool (n, 1, gh, gw) patch mask with visible and masked patches in every image."""
    if gh * gw < 2:
        raise ValueError(f"a {gh} x {gw} patch grid cannot hold both a visible and a masked patch")
    g = torch.Generator().manual_seed(seed)
    while True:
        mask = torch.rand(n, 1, gh, gw, generator=g) < 0.5
        per_image = mask.flatten(1).sum(1)
        if bool((per_image > 0).all() and (per_image < gh * gw).all()):
            return mask


def spark_mask(n: int, h: int, w: int, ratio: float, patch: int, seed: int = 0) -> torch.Tensor:
    """SparK patch mask at resolution h x w with patch x patch blocks (h, w rounded up to a multiple)."""
    g = torch.Generator().manual_seed(seed)
    gh, gw = math.ceil(h / patch), math.ceil(w / patch)
    m = upsample_mask(patch_mask(n, (gh, gw), ratio, generator=g), gh * patch, gw * patch)
    return m[:, :, :h, :w].contiguous()


def make_mask(kind: str, n: int, h: int, w: int, ratio: float, seed: int = 0) -> torch.Tensor:
    if kind == "random":
        return random_mask(n, h, w, ratio, seed)
    if kind == "spark":
        return spark_mask(n, h, w, ratio, patch=4, seed=seed)
    raise ValueError(kind)


NORM_TEST_SIZE = (13, 11)  # odd H, W of the norm tests


def make_active(kind: str, n: int, h: int = NORM_TEST_SIZE[0], w: int = NORM_TEST_SIZE[1],
                seed: int = 0) -> torch.Tensor:
    """A test mask: "visible" (all active), "masked" (none), "single" (one active site), or a ratio-0.6
    "random" / "spark" mask."""
    if kind == "visible":
        return torch.ones(n, 1, h, w, dtype=torch.bool)
    if kind == "masked":
        return torch.zeros(n, 1, h, w, dtype=torch.bool)
    if kind == "single":
        m = torch.zeros(n, 1, h, w, dtype=torch.bool)
        m[n - 1, 0, h // 2, w // 3] = True
        return m
    return make_mask(kind, n, h, w, 0.6, seed=seed)


def assert_close_to_reference(out: torch.Tensor, ref_lowp: torch.Tensor, ref_f64: torch.Tensor, what: str,
                              terms: float = 0.0) -> None:
    """out (a backend in dtype d) vs the reference in float64, allowed ERROR_MULTIPLE x the reference's own
    error in dtype d (ref_lowp) plus ABS_FLOOR[d] x the result's magnitude, or `terms` when larger: the
    magnitude of the terms a result cancels down from (a normalization's gain 1/sqrt(var + eps) times
    its inputs), where the reference's own error can be zero by luck on a one-element result.
    float64: RTOL and ATOL x max(1, terms)."""
    dtype = out.dtype
    out64, ref64 = out.double(), ref_f64.double()
    assert out.shape == ref_f64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_f64.shape)}"
    assert torch.equal(torch.isnan(out64), torch.isnan(ref64)), f"{what}: NaN pattern differs"
    assert torch.equal(ref64.isinf(), out64.isinf()) and torch.equal(out64[out64.isinf()], ref64[ref64.isinf()]), \
        f"{what}: infinities differ"
    finite = ref64.isfinite()  # non-finite values are equal by now; compare the rest
    out64, ref64, ref_lowp = out64[finite], ref64[finite], ref_lowp[finite]
    if dtype == torch.float64:
        torch.testing.assert_close(out64, ref64, rtol=RTOL[dtype], atol=ATOL[dtype] * max(1.0, terms),
                                   msg=lambda m: f"{what}: {m}")
        return
    ref_err = (ref_lowp.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    err = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
    scale = max(ref64.abs().max().item() if ref64.numel() else 0.0, terms)
    bound = ERROR_MULTIPLE * ref_err + ABS_FLOOR[dtype] * max(1.0, scale)
    assert err <= bound, f"{what}: max error {err:.3g} exceeds {bound:.3g} (reference's own {dtype} error {ref_err:.3g})"


# -- backends under test ------------------------------------------------------------------------------
# The native primitives each op needs (the op registry); a backend whose kernels for an op are not built
# yet is reported as an expected failure with that reason (never skipped, never counted as passing).
OP_PRIMITIVES = {op.short: tuple(p.native for p in op.primitives) for op in OPS.values()}


def cpu_tensor_backends() -> list:
    """Every available backend that runs CPU tensors without the Triton interpreter (tested elsewhere)."""
    import spark_kernels as sk
    from spark_kernels._backends import get_backend
    return [name for name in sk.available_backends()
            if name != "triton" and "cpu" in get_backend(name).device_types]


def missing_kernels(backend: str, op: str) -> list:
    if backend != "cpu":
        return []
    return [p for p in OP_PRIMITIVES[op]
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"spark_kernels::{p}", "CPU")]


def kernel_backends(*ops: str) -> list:
    """pytest params over cpu_tensor_backends() for a test that runs the kernels of `ops`: a backend whose
    kernels are missing must fail with NotImplementedError (strict xfail, reason named)."""
    import pytest
    params = []
    for name in cpu_tensor_backends():
        missing = [k for op in ops for k in missing_kernels(name, op)]
        marks = [pytest.mark.xfail(raises=NotImplementedError, strict=True,
                                   reason=f"{name} kernels not built yet: {', '.join(missing)}")] if missing else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def tensor_device(backend: str) -> str:
    """The device a fused backend's tests put their tensors on: CUDA for "cuda", and for "triton" unless it
    runs in Triton's interpreter (TRITON_INTERPRET=1, on CPU tensors); CPU for the others."""
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        from spark_kernels.triton import interpreter_requested
        return "cpu" if interpreter_requested() else "cuda"
    return "cpu"


def fused_backends(*dtypes: torch.dtype) -> list:
    """pytest params (backend, device, dtype) for every fused backend that runs here, on the device its
    tensors live on (tensor_device: so on a GPU machine with TRITON_INTERPRET=0, "triton" and "cuda" run
    CUDA tensors), for each of `dtypes` the backend takes for every op."""
    import pytest
    import spark_kernels as sk
    params = []
    for name in sk.available_backends():
        if name == "reference":
            continue
        device = tensor_device(name)
        if device == "cuda" and not torch.cuda.is_available():
            continue
        for dtype in dtypes:
            if all(dtype in op.support[name].dtypes.values for op in OPS.values() if name in op.support):
                params.append(pytest.param(name, device, dtype, id=f"{name}-{device}-{str(dtype)[6:]}"))
    return params


def assert_index_and_dtype_checks(call) -> None:
    """call(x, index) runs a C++ norm kernel on x (2, 4, 3, 3): a bad site index (not int32, out of range, not
    ascending, negative) and an x of a dtype the kernels do not take must raise errors that name them."""
    import pytest
    x = torch.randn(2, 4, 3, 3)
    index = torch.tensor([0, 5, 17], dtype=torch.int32)
    bad_indices = ((index.long(), "index must be int32"),
                   *((torch.tensor(i, dtype=torch.int32), "index must hold strictly ascending")
                     for i in ([0, 99], [3, 1], [-1])))
    for bad, message in bad_indices:
        with pytest.raises(RuntimeError, match=message):
            call(x, bad)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        call(x.int(), index)
