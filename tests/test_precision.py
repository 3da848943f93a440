"""spark.precision: what --precision auto picks and why, the fp16 restrictions, the step's autocast."""
import contextlib

import pytest
import torch

from spark import precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,expected", [({"avx2", "avx512_bf16"}, "bf16"), ({"amx_bf16", "amx_tile"}, "bf16"),
                                            ({"avx2", "avx512f"}, "fp32"), (set(), "fp32")])
def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(flags, expected):
    chosen, why = precision.resolve("auto", CPU, flags)
    assert chosen == expected and why.startswith("auto: ")
    if expected == "bf16":
        assert any(flag in why for flag in precision.CPU_BF16_FLAGS)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "avx2", "avx512_bf16"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == set()


def test_explicit_choices_and_errors():
    assert precision.resolve("bf16", CPU, {"avx512_bf16"}) == ("bf16", "requested")
    chosen, why = precision.resolve("bf16", CPU, {"avx2"})
    assert chosen == "bf16" and why.startswith("requested") and "not native" in why and "avx512_bf16" in why
    assert precision.resolve("fp32", CPU) == ("fp32", "requested")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        precision.resolve("fp16", CPU)
    with pytest.raises(ValueError, match="must be one of"):
        precision.resolve("fp8", CPU)


def test_autocast_context_and_scaler():
    layer = torch.nn.Linear(4, 4)
    with precision.autocast("bf16", CPU):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with precision.autocast("fp32", CPU):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    assert precision.grad_scaler("bf16", CPU) is None and precision.grad_scaler("fp32", CPU) is None


# -- Float32Compute: convs and linears under CPU bf16 autocast computed in float32 on bf16 operands ----------------
def float32_compute_cases():
    """(name, fn(x, weight, bias), x, weight, bias): each functional Float32Compute takes, with arguments passed
    positionally and by keyword."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).float()

    F = torch.nn.functional
    return [
        ("conv2d", lambda x, w, b: F.conv2d(x, w, b, 2, 1, 1, 2), rand(2, 4, 9, 9), rand(6, 2, 3, 3), rand(6)),
        ("conv2d_keywords", lambda x, w, b: F.conv2d(x, w, bias=b, padding=(2, 1), dilation=(2, 1)),
         rand(2, 3, 8, 7), rand(5, 3, 3, 3), None),
        ("conv_transpose2d", lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
         rand(2, 4, 5, 6), rand(4, 3, 3, 3), rand(3)),
        ("conv2d_channels_last", lambda x, w, b: F.conv2d(x, w, b, padding=1),
         rand(3, 8, 6, 5).contiguous(memory_format=torch.channels_last), rand(4, 8, 3, 3), rand(4)),
        ("linear", lambda x, w, b: F.linear(x, w, b), rand(2, 3, 8), rand(5, 8), rand(5)),
    ]


def run_under(context, fn, x, weight, bias, saved=None):
    """Output and gradients (input, weight, bias) of fn under context, with a fixed upstream gradient; the dtypes of
    the tensors its forward keeps for backward appended to `saved`."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]

    def keep(t):
        if saved is not None:
            saved.append(t.dtype)
        return t

    with context, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = fn(*leaves)
    upstream = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y.double() * upstream).sum().backward()
    return [y] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("sliced", [False, True], ids=["whole", "sliced"])
@pytest.mark.parametrize("case", float32_compute_cases(), ids=lambda c: c[0])
def test_float32_compute_is_bf16_autocast_computed_in_float32(case, sliced, monkeypatch):
    """Under bf16 autocast with Float32Compute each op gives bf16 outputs (in autocast's memory layout) and
    gradients of the operands' dtypes, within a small multiple of native autocast's own error of the exact
    (float64) result on the same bf16-rounded operands, and keeps for backward the bf16-rounded input and weight
    only, as autocast does; a convolution alike in one piece and one image at a time (FLOAT32_SLICE_BYTES)."""
    _, fn, x, weight, bias = case
    if sliced:
        monkeypatch.setattr(precision, "FLOAT32_SLICE_BYTES", 1)
    bf16 = [t.to(torch.bfloat16).double() if t is not None else None for t in (x, weight, bias)]
    exact = run_under(contextlib.nullcontext(), fn, *bf16)
    native = run_under(torch.autocast("cpu", dtype=torch.bfloat16), fn, x, weight, bias)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    stack.enter_context(precision.Float32Compute())
    saved = []
    got = run_under(stack, fn, x, weight, bias, saved)
    assert got[0].dtype == torch.bfloat16 and "InFloat32" in type(got[0].grad_fn).__name__
    assert saved == [torch.bfloat16, torch.bfloat16]
    for what, out, own, want in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, native, exact):
        assert out.dtype == own.dtype and out.stride() == own.stride(), what
        err, own_err = (out.double() - want).abs().max().item(), (own.double() - want).abs().max().item()
        assert err <= 2 * own_err + 1e-6 * want.abs().max().item(), f"{what}: {err:.3g} vs autocast's {own_err:.3g}"


def test_float32_compute_leaves_other_calls_alone():
    """Outside bf16 autocast (or with it disabled inside), for a conv with string padding, and for a call with an
    argument the functional does not take, PyTorch runs as it would without the mode."""
    conv = torch.nn.Conv2d(3, 4, 3, padding="same")
    x = torch.randn(1, 3, 6, 6)
    with precision.Float32Compute():
        assert conv(x).dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
            assert y.dtype == torch.bfloat16 and "InFloat32" not in type(y.grad_fn).__name__
            with torch.autocast("cpu", enabled=False):
                assert torch.nn.functional.linear(x, torch.randn(4, 6)).dtype == torch.float32
            with pytest.raises(TypeError):  # an argument conv2d does not take: PyTorch's own error
                torch.nn.functional.conv2d(x, conv.weight, output_padding=1)


@pytest.mark.parametrize("takes_bf16", [True, False])
def test_bf16_context_computes_in_float32_only_where_onednn_takes_no_bf16(takes_bf16, monkeypatch):
    monkeypatch.setattr(precision, "onednn_takes_bf16", lambda: takes_bf16)
    layer = torch.nn.Linear(4, 4)
    with precision.autocast("bf16", CPU):
        y = layer(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    assert ("InFloat32" in type(y.grad_fn).__name__) == (not takes_bf16)
    chosen, why = precision.resolve("bf16", CPU, {"avx2"})
    assert chosen == "bf16" and ("Float32Compute" in why) == (not takes_bf16)


def test_float32_compute_of_an_empty_batch():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), precision.Float32Compute():
        y = conv(x)
    assert y.shape == (0, 4, 5, 5) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.shape == x.shape and torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
