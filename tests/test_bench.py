"""The benchmark harness end to end at tiny sizes: results schema, report, compare mode. No timing is asserted."""
import copy
import dataclasses
import json

import pytest

from bench import compare, report, suite
from bench.__main__ import main as bench_main
from bench.ops import COMPILED, REFERENCE

# compile_budget_s=0: every compiled case is recorded as skipped, without compiling (seconds each here).
TINY = suite.Settings(batch=2, repeats=1, warmup=1, passes=("forward_backward",), stages={"convnext_tiny": [(8, 8, 2)]}, net_ops=None, compile_stages=None, compile_budget_s=0,
                      sweep_shape=(8, 8, 2), mask_ratios=(0.0, 0.5), batch_sizes=(1, 2), sweep_ops=("dwconv3",),
                      sweep_repeats=1, models=(), machine_repeats=1, machine_gemm_size=64,
                      machine_stream_elements=1 << 12, grad_outs=("random", "expanded"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    r = suite.run(TINY)
    path = tmp_path_factory.mktemp("bench") / "results.json"
    path.write_text(json.dumps(r))
    return {"dict": r, "path": str(path)}


def test_results_schema(results):
    r = report.load(results["path"])  # json round trip + schema check
    assert r["backends"] == suite.fused_backends()
    ops = {row["op"] for row in r["ops"]}
    assert ops == set(TINY.ops)
    assert {row["pass"] for row in r["ops"]} == set(TINY.passes)
    assert {row["grad_out"] for row in r["ops"]} == set(TINY.grad_outs)
    for row in r["ops"]:
        compiled = {COMPILED} if row["grad_out"] == TINY.grad_outs[0] else set()  # compiled at one variant
        assert set(row["times"]) == {REFERENCE, *compiled, *r["backends"]}
        if compiled:
            assert row["times"][COMPILED]["error"].startswith("skipped: the run's torch.compile budget")
    for row in r["sweeps"]["mask_ratio"] + r["sweeps"]["batch"]:
        assert set(row["times"]) == {REFERENCE, *r["backends"]}
    for row in r["ops"] + r["sweeps"]["mask_ratio"] + r["sweeps"]["batch"]:
        assert row["times"][REFERENCE]["median"] > 0, "the reference always runs"
        assert row["roofline_s"] > 0 and row["flops"] > 0 and row["bytes"] > 0
    ratios = sorted(row["mask_ratio"] for row in r["sweeps"]["mask_ratio"])
    assert ratios == sorted(TINY.mask_ratios)
    fractions = {row["mask_ratio"]: row["active_fraction"] for row in r["sweeps"]["mask_ratio"]}
    assert fractions[0.0] == 1.0 and fractions[0.5] == pytest.approx(0.5)
    assert sorted(row["batch"] for row in r["sweeps"]["batch"]) == sorted(TINY.batch_sizes)
    assert r["machine"]["flops_per_s"] > 0 and r["machine"]["bytes_per_s"] > 0
    assert r["environment"]["allocator"]


def test_schema_check_names_the_missing_field(results):
    broken = copy.deepcopy(results["dict"])
    del broken["ops"][0]["times"]
    with pytest.raises(ValueError, match="times"):
        report.check_schema(broken)


def test_report_renders_every_case(results, tmp_path):
    r = results["dict"]
    text = report.render_markdown(r)
    for op in TINY.ops:
        assert f"| convnext_tiny | {op} | 8@8² | " in text
    assert "| skipped |" in text
    assert "Sparsity limit" in text and "GFLOP/s" in text and r["environment"]["allocator"] in text
    assert "Linearity in the active fraction" in text
    pytest.importorskip("matplotlib")
    plots = report.write_plots(r, str(tmp_path))
    assert sorted(p.rsplit("/", 1)[-1] for p in plots) == ["batch_sweep.png", "mask_sweep.png", "speedup.png"]
    for p in plots:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_linear_fit_overhead():
    fit = report.linear_fit([(0.25, 1.0), (0.5, 2.0), (1.0, 4.0)])
    assert fit["overhead_at_zero"] == pytest.approx(0.0, abs=1e-12) and fit["r2"] == pytest.approx(1.0)
    flat = report.linear_fit([(0.25, 3.0), (1.0, 3.0)])
    assert flat["overhead_at_zero"] == pytest.approx(1.0)


def test_compare_detects_a_planted_regression(results, tmp_path, capsys):
    old = results["dict"]
    new = copy.deepcopy(old)
    row = new["ops"][0]
    row["times"][REFERENCE]["median"] *= 1.5  # 50% slower
    name = compare._case_key("ops", row) + f" {REFERENCE} median s"
    diff = compare.compare(old, new, tolerance=0.1)
    assert [d[0] for d in diff["worse"]] == [name]
    assert diff["better"] == [] and diff["only_old"] == [] and diff["only_new"] == []
    assert compare.compare(old, new, tolerance=0.6)["worse"] == []  # within tolerance
    faster = copy.deepcopy(old)
    faster["ops"][0]["times"][REFERENCE]["median"] /= 2
    assert [d[0] for d in compare.compare(old, faster, 0.1)["better"]] == [name]

    new_path = tmp_path / "new.json"
    new_path.write_text(json.dumps(new))
    assert bench_main(["compare", results["path"], str(new_path), "--tolerance", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "WORSE (1)" in out and name in out and "+50.0%" in out


def test_gpu_acceptance_bench_runs_on_cpu_in_quick_mode(tmp_path):
    """bench.gpu (scripts/gpu_check.sh's benchmarks) end to end on CPU tensors at tiny sizes: machine, ops with
    rooflines and speedups, a SparK step, the markdown report. Nothing about the figures is asserted."""
    from bench import gpu
    machine, ops, models = (str(tmp_path / f"{name}.json") for name in ("machine", "ops", "models"))
    common = ["--quick", "--device", "cpu", "--backends", "cpu"]
    assert gpu.main(["--section", "machine", "--out", machine, *common]) == 0
    assert gpu.main(["--section", "ops", "--machine", machine, "--out", ops, "--ops", "batch_norm", *common]) == 0
    assert gpu.main(["--section", "models", "--out", models, "--models", "resnet50", "--precisions", "fp32",
                     *common]) == 0
    m = json.load(open(machine))["machine"]
    assert m["copy_bytes_per_s"] > 0 and m["fma_per_s"] > 0, m
    rows = json.load(open(ops))["ops"]
    assert {(r["backend"], r["dtype"]) for r in rows} == {(b, d) for b in ("reference", "cpu") for d in gpu.DTYPES}
    fp32_cpu = next(r for r in rows if r["backend"] == "cpu" and r["dtype"] == "fp32")
    bf16_cpu = next(r for r in rows if r["backend"] == "cpu" and r["dtype"] == "bf16")
    for row in (fp32_cpu, bf16_cpu):
        assert "error" not in row and row["speedup"] > 0 and row["forward_roofline_fraction"] > 0, row
    steps = json.load(open(models))["models"]
    assert [r["backend"] for r in steps] == ["reference", "cpu"] and all(r["images_per_s"] > 0 for r in steps)
    text = gpu.render([json.load(open(p)) for p in (machine, ops, models)])
    assert "| batch_norm | 8@8 | fp32 | cpu |" in text and "| resnet50 | fp32 | cpu | 2 |" in text


def test_official_group_norm_contender_equals_the_reference():
    """The benchmark's official-style GroupNorm (per image: gather active rows -> F.group_norm -> scatter)
    computes what the masked-dense reference does, forward and backward."""
    import torch
    from bench.ops import official_group_norm
    from spark_kernels import reference
    from helpers import make_active
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, 4, generator=g, dtype=torch.float64)
    w, b = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    mask = make_active("random", 3, 5, 4)
    mask[1] = False  # an image without active sites
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for fn in (official_group_norm, reference.masked_group_norm):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(leaves[0], mask, 4, leaves[1], leaves[2], 1e-5)
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_ops_in_bf16_report_their_precision():
    """`python -m bench --precision bf16`: the ops run on bf16 activations and the report says so."""
    r = suite.run(dataclasses.replace(TINY, precision="bf16", ops=("dwconv3", "batch_norm")), sections=("ops",))
    assert {row["dtype"] for row in r["ops"]} == {"bfloat16"}
    for row in r["ops"]:
        assert row["times"][REFERENCE]["median"] > 0 and all(row["times"][b]["median"] > 0 for b in r["backends"])
    assert "Precision: bf16 (" in report.render_markdown(r)


def test_model_step_bf16_in_separate_processes(tmp_path, capsys):
    """`python -m bench.model_step --precision bf16 --separate`: each model's time and peak memory come from its
    own subprocess, under autocast; the markdown table has a row per model. Tiny sizes, no figure asserted."""
    from bench import model_step
    out = tmp_path / "steps.json"
    assert model_step.main(["--models", "resnet18", "--batch", "1", "--input-size", "32", "--steps", "1",
                            "--warmup", "0", "--precision", "bf16", "--separate", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())["models"]
    assert result["precision"] == "bf16" and result["timing"] == "separate processes"
    for row in result["rows"].values():
        assert row["images_per_s"] > 0 and row["peak_memory_bytes"] > row["rss_before_first_step_bytes"] > 0, row
    table = capsys.readouterr().err
    assert "| resnet18 | bf16 | reference | 1 | " in table and "| resnet18 | bf16 | fused default | 1 | " in table


def test_model_step_table_compares_precisions_and_models():
    from bench import model_step

    def rows(ips_ref, ips_fused, mem_ref, mem_fused):
        return {"reference": {"images_per_s": ips_ref, "peak_memory_bytes": mem_ref},
                "cpu": {"images_per_s": ips_fused, "peak_memory_bytes": mem_fused}}
    results = {"models": [{"model": "resnet50", "precision": "fp32", "batch": 16, "rows": rows(1.0, 2.0, 4e9, 2e9)},
                          {"model": "resnet50", "precision": "bf16", "batch": 16, "rows": rows(0.5, 3.0, 3e9, 1e9)}]}
    lines = model_step.markdown_table(results).splitlines()
    assert lines[2] == "| resnet50 | fp32 | reference | 16 | 1.00 | 4.00 |  |  |"
    assert lines[3] == "| resnet50 | fp32 | fused cpu | 16 | 2.00 | 2.00 | 2.00x / 0.50x |  |"
    assert lines[4] == "| resnet50 | bf16 | reference | 16 | 0.50 | 3.00 |  | 0.50x / 0.75x |"
    assert lines[5] == "| resnet50 | bf16 | fused cpu | 16 | 3.00 | 1.00 | 6.00x / 0.33x | 1.50x / 0.50x |"


def test_model_step_rejects_bad_sizes():
    from bench import model_step
    with pytest.raises(SystemExit):
        model_step.main(["--batch", "0"])
    with pytest.raises(SystemExit):
        model_step.main(["--separate", "--no-memory"])


def test_ops_runs_the_chosen_stages_only(tmp_path, capsys):
    from bench import ops
    out = tmp_path / "ops.json"
    assert ops.main(["--ops", "dwconv3", "--stages", "768@7", "--batch", "1", "--repeats", "1",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["ops"]
    assert [(r["channels"], r["size"]) for r in rows] == [(768, 7)]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ops.main(["--stages", "768@7", "96@14"])
    assert "--stages: 96@14 not among convnext_tiny's stages 96@56, 192@28, 384@14, 768@7" in capsys.readouterr().err


def test_roofline_bytes_follow_the_dtype_and_the_grad_out():
    """An element moves its dtype's bytes; an expanded grad_out (one value) is not read as a tensor."""
    from bench.roofline import op_cost
    import torch
    for op in ("batch_norm", "layer_norm_cl", "dwconv3"):
        fp32 = op_cost(op, 16, 8, 2, 0.5, True)
        bf16 = op_cost(op, 16, 8, 2, 0.5, True, dtype=torch.bfloat16)
        expanded = op_cost(op, 16, 8, 2, 0.5, True, grad_out="expanded")
        assert bf16["bytes"] == fp32["bytes"] / 2 and bf16["flops"] == fp32["flops"], op
        assert expanded["bytes"] == fp32["bytes"] - 4 * 16 * 8 * 8 * 2 * 0.5, op  # one active-size read fewer
        assert op_cost(op, 16, 8, 2, 0.5, False, grad_out="expanded") == op_cost(op, 16, 8, 2, 0.5, False), op


def test_ops_table_has_the_grad_out_variants(tmp_path):
    """The backward's grad_out variants are a named dimension of the ops rows, with their own roofline bytes."""
    settings = dataclasses.replace(TINY, ops=("batch_norm", "layer_norm_cl"), compile_stages=(),
                                   grad_outs=("random", "expanded", "nchw"))
    rows = suite.run(settings, ("machine", "ops"))["ops"]
    for op in settings.ops:
        by_grad = {r["grad_out"]: r for r in rows if r["op"] == op}
        assert set(by_grad) == {"random", "expanded", "nchw"}, op
        assert by_grad["expanded"]["bytes"] < by_grad["random"]["bytes"] == by_grad["nchw"]["bytes"], op
        assert all(r["roofline_s"] > 0 and r["times"]["cpu" if "cpu" in r["times"] else REFERENCE]["median"] > 0
                   for r in by_grad.values()), op
    assert "| convnext_tiny | batch_norm | 8@8² | expanded |" in "\n".join(report.ops_table({"backends": [],
                                                                                             "ops": rows}))


def test_grad_out_variants_have_their_layouts():
    from bench.ops import make_case
    import torch
    for op, rows_layout in (("batch_norm", True), ("layer_norm_cl", False)):
        random, expanded, nchw = (make_case(op, 4, 8, 2, 2, grad_out=g).grad for g in ("random", "expanded", "nchw"))
        assert expanded.stride() == (0, 0, 0, 0) and torch.all(expanded == 1)
        nchw_memory = nchw.permute(0, 3, 1, 2) if op == "layer_norm_cl" else nchw
        assert nchw_memory.is_contiguous() and torch.equal(nchw, random)
        assert random.is_contiguous(memory_format=torch.channels_last) == rows_layout, op


def test_precisions_time_both_precisions_of_the_fused_op(tmp_path, capsys):
    """bench.precisions: a row per op and stage with the fused op's medians in fp32 and bf16 and their ratio."""
    from bench import precisions
    out = tmp_path / "precisions.json"
    assert precisions.main(["--ops", "batch_norm", "dwconv3", "--stages", "768@7", "--batch", "1", "--repeats", "1",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["op"], r["channels"], r["size"]) for r in rows] == [("batch_norm", 768, 7), ("dwconv3", 768, 7)]
    for r in rows:
        fp32, bf16 = r["times"]["fp32"]["median"], r["times"]["bf16"]["median"]
        assert fp32 > 0 and bf16 > 0 and r["bf16_vs_fp32"] == fp32 / bf16
    assert "| convnext_tiny | dwconv3 | 768@7 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        precisions.main(["--precision", "fp32"])
