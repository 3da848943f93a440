"""spark.precision: what --precision auto picks and why, the fp16 restrictions, the step's autocast."""
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
