#!/usr/bin/env python
"""Mutation run over the code the fused and the reference paths share (documented in docs/guarantees.md).

Plants one small bug at a time in a private copy of the repository and runs the tests that should see
it, stopping at the first failure (-x). A mutant is *killed* when a test fails (or the tests time out,
or, for C++, the extension or the C++ tests fail to build); it *survives* when every test passes.

Python mutants (AST level) in spark_kernels/*.py, spark/model.py and spark/sparse_encoder.py: arithmetic,
comparison and boolean operators swapped, numeric and boolean constants changed, `not` and unary minus
dropped, min <-> max, the branches of `torch.where` and of conditional expressions swapped, `if` tests
negated, and calls made as statements (in-place updates, initializers) dropped. Not mutated: docstrings
and strings, `raise` / `assert` statements and the tests of `if`s whose body only raises (argument
validation, tested by tests/test_hostile_inputs.py), logging.
C++ mutants (text level) in csrc/common/*.h: binary operators and numeric literals in code lines, not in
comments or TORCH_CHECK argument checks; each one rebuilds the CPU extension (ninja recompiles the
translation units that include the header) and the ctest programs, then runs ctest and the op tests.

    python scripts/mutate.py --list                 # enumerate the mutants, run nothing
    python scripts/mutate.py                        # the documented run (budgets below), ~2 h 15 min on 2 busy cores
    python scripts/mutate.py --only spark/model.py  # the same selection, restricted to some files
    python scripts/mutate.py --ids ID [ID ...] --rerun   # run given mutants again (ids as printed)

Results are appended to --out (JSON lines; mutants already there are skipped, so an interrupted run
resumes) and summarized at the end. Needs the CPU extension built in place (scripts/setup.sh) for the
Python mutants; the C++ mutants build their own copy (SPARK_KERNELS_NO_CUDA=1).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--no-header"]

# The tests that should see a bug in each file, cheapest and most direct first (-x stops at the first
# failure, so a killed mutant costs little; a surviving one runs all of them).
MODEL_TESTS = ["tests/test_model_semantics.py", "tests/test_sparse_encoder.py",
               "tests/test_model.py::test_loss_only_counts_masked_patches",
               "tests/test_model.py::test_features_are_zero_at_masked_sites",
               "tests/test_model.py::test_reconstruct_shapes_and_visible_patches_pasted_back",
               "tests/test_model.py::test_user_encoder_with_feature_info_trains",
               "tests/test_model.py::test_any_encoder_follows_the_official_rules",
               "tests/test_model.py::test_feature_info_without_reductions_raises",
               "tests/test_model.py::test_fused_convnext_drop_path_matches_reference"]
OP_TESTS = ["tests/test_reference.py", "tests/test_batch_norm.py", "tests/test_layer_norm.py",
            "tests/test_group_norm.py", "tests/test_depthwise_conv.py"]
PYTHON_TARGETS: Dict[str, List[str]] = {
    "spark_kernels/masks.py": ["tests/test_sites.py", "tests/test_model_semantics.py"],
    "spark_kernels/_sites.py": ["tests/test_sites.py", "tests/test_reference.py", "tests/test_sparse_encoder.py",
                                "tests/test_depthwise_conv.py"],
    "spark_kernels/reference.py": OP_TESTS,
    "spark_kernels/batch_norm.py": ["tests/test_batch_norm.py"],
    "spark_kernels/layer_norm.py": ["tests/test_layer_norm.py"],
    "spark_kernels/group_norm.py": ["tests/test_group_norm.py"],
    "spark_kernels/depthwise_conv.py": ["tests/test_depthwise_conv.py"],
    "spark_kernels/_layout.py": ["tests/test_depthwise_conv.py", "tests/test_batch_norm.py", "tests/test_layer_norm.py"],
    "spark_kernels/_backends.py": ["tests/test_backends.py", "tests/test_reference.py", "tests/test_registry.py"],
    "spark_kernels/_registry.py": ["tests/test_registry.py", "tests/test_backends.py"],
    "spark_kernels/nn.py": ["tests/test_sparse_encoder.py", "tests/test_model_semantics.py",
                            "tests/test_batch_norm.py", "tests/test_layer_norm.py", "tests/test_depthwise_conv.py"],
    "spark/model.py": MODEL_TESTS,
    "spark/sparse_encoder.py": MODEL_TESTS,
}
CPP_TARGETS: Dict[str, List[str]] = {
    "csrc/common/dwconv_site.h": ["tests/test_depthwise_conv.py"],
    "csrc/common/norm_row.h": ["tests/test_batch_norm.py", "tests/test_layer_norm.py", "tests/test_group_norm.py"],
    "csrc/common/layout.h": ["tests/test_depthwise_conv.py", "tests/test_batch_norm.py", "tests/test_layer_norm.py"],
    "csrc/common/norm_checks.h": ["tests/test_batch_norm.py", "tests/test_layer_norm.py"],
    "csrc/common/dispatch.h": ["tests/test_depthwise_conv.py", "tests/test_batch_norm.py", "tests/test_layer_norm.py"],
    "csrc/norm_ops.h": ["tests/test_batch_norm.py", "tests/test_layer_norm.py"],
    "csrc/dwconv_ops.h": ["tests/test_depthwise_conv.py"],
}
DEFAULT_PYTHON_BUDGET = 50
DEFAULT_CPP_BUDGET = 12
MIN_PER_FILE = {False: 3, True: 3}  # Python, C++


@dataclass
class Mutant:
    id: str
    path: str
    line: int
    before: str
    after: str
    source: str  # the whole mutated file
    tests: List[str]
    cpp: bool = False


# ---- Python mutants ---------------------------------------------------------------------------------

BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
               ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
               ast.RShift: ast.LShift, ast.LShift: ast.RShift}
CMP_SWAPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
             ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


def _raises_only(body: Sequence[ast.stmt]) -> bool:
    return all(isinstance(s, ast.Raise) for s in body)


def _is_docstring(node: ast.AST) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _skipped_subtrees(tree: ast.Module) -> set:
    """Ids of nodes whose subtrees are not mutated (validation, messages, annotations, docstrings)."""
    skip = set()

    def mark(node):
        for n in ast.walk(node):
            skip.add(id(n))

    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.Assert, ast.JoinedStr)) or _is_docstring(node):
            mark(node)
        elif isinstance(node, ast.If) and _raises_only(node.body) and not node.orelse:
            mark(node.test)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if a.annotation is not None:
                    mark(a.annotation)
            if node.returns is not None:
                mark(node.returns)
            for d in node.decorator_list:
                mark(d)
        elif isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn":
            mark(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mark(node)
    return skip


def _constant_variants(value) -> List[object]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1] if value != 1 else [0, 2]
    if isinstance(value, float):
        return [value * 10 if value else 1.0]
    return []


def _python_edits(tree: ast.Module) -> Iterator[Tuple[ast.AST, str, Callable[[ast.AST], ast.AST]]]:
    """(node, kind, make_replacement) for every mutation point of the module."""
    skip = _skipped_subtrees(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            yield node, "binop", lambda n: ast.BinOp(n.left, BINOP_SWAPS[type(n.op)](), n.right)
        elif isinstance(node, ast.AugAssign) and type(node.op) in BINOP_SWAPS:
            yield node, "augassign", lambda n: ast.AugAssign(n.target, BINOP_SWAPS[type(n.op)](), n.value)
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in CMP_SWAPS:
                    def swap(n, i=i):
                        ops = list(n.ops)
                        ops[i] = CMP_SWAPS[type(ops[i])]()
                        return ast.Compare(n.left, ops, n.comparators)
                    yield node, "compare", swap
        elif isinstance(node, ast.BoolOp):
            yield node, "boolop", lambda n: ast.BoolOp(ast.Or() if isinstance(n.op, ast.And) else ast.And(), n.values)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            yield node, "unary", lambda n: n.operand
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str) and node.value is not None:
            for v in _constant_variants(node.value):
                yield node, "constant", lambda n, v=v: ast.Constant(v)
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name == "where" and len(node.args) == 3:
                yield node, "where-swap", lambda n: ast.Call(n.func, [n.args[0], n.args[2], n.args[1]], n.keywords)
            elif name in ("max", "min") and isinstance(f, ast.Name):
                yield node, "minmax", lambda n: ast.Call(ast.Name("min" if n.func.id == "max" else "max", ast.Load()),
                                                         n.args, n.keywords)
        elif isinstance(node, ast.IfExp):
            yield node, "ifexp-swap", lambda n: ast.IfExp(n.test, n.orelse, n.body)
        elif isinstance(node, ast.If) and not _raises_only(node.body):
            yield node, "if-negate", lambda n: ast.If(ast.UnaryOp(ast.Not(), n.test), n.body, n.orelse)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            yield node, "drop-call", lambda n: ast.Pass()


def python_mutants(path: str, tests: List[str]) -> List[Mutant]:
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    mutants = []
    n_points = len(list(_python_edits(ast.parse(text))))
    for k in range(n_points):
        tree = ast.parse(text)  # fresh tree per mutant: nodes are replaced in place
        node, kind, make = list(_python_edits(tree))[k]
        before = ast.unparse(node).splitlines()[0][:100]
        new_node = make(node)
        after = ast.unparse(new_node).splitlines()[0][:100] if not isinstance(new_node, ast.Pass) else "pass"
        line = node.lineno

        class Swap(ast.NodeTransformer):
            def visit(self, n):
                if n is node:
                    return ast.copy_location(new_node, n)
                return super().visit(n)

        mutated = ast.unparse(ast.fix_missing_locations(Swap().visit(tree)))
        mutants.append(Mutant(f"{path}:{line}:{k}:{kind}", path, line, before, after, mutated + "\n", tests))
    return mutants


# ---- C++ mutants ------------------------------------------------------------------------------------

CPP_OPERATORS = [(" + ", " - "), (" - ", " + "), (" * ", " / "), (" / ", " * "), (" < ", " <= "), (" <= ", " < "),
                 (" > ", " >= "), (" >= ", " > "), (" == ", " != "), (" != ", " == "), (" && ", " || "),
                 (" || ", " && "), (" += ", " -= "), (" *= ", " /= "), (" ? ", None)]
CPP_LITERAL = re.compile(r"(?<![\w.])(\d+)(?![\w.])")


def _cpp_code_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(index, line) of the lines holding code worth mutating: not comments, preprocessor lines,
    includes, or (possibly multi-line) TORCH_CHECK statements."""
    in_check = False
    for i, line in enumerate(text.splitlines()):
        s = line.strip()
        if in_check or s.startswith("TORCH_CHECK"):
            in_check = not s.endswith(";")
            continue
        if not s or s.startswith(("//", "#", "namespace", "template", "}")):
            continue
        yield i, line


def cpp_mutants(path: str, tests: List[str]) -> List[Mutant]:
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    lines = text.splitlines()
    mutants = []
    for i, line in _cpp_code_lines(text):
        code = line.split("//")[0]
        edits = []
        for old, new in CPP_OPERATORS:
            if new is None:
                continue
            start = 0
            while (pos := code.find(old, start)) >= 0:
                edits.append((pos, len(old), new))
                start = pos + 1
        for m in CPP_LITERAL.finditer(code):
            value = int(m.group(1))
            edits.append((m.start(), len(m.group(1)), str(value // 2 if value > 2 else value + 1)))
        for pos, length, new in edits:
            mutated_line = line[:pos] + new + line[pos + length:]
            mutated = "\n".join(lines[:i] + [mutated_line] + lines[i + 1:]) + "\n"
            mid = f"{path}:{i + 1}:{pos}:{line[pos:pos + length].strip()}->{new.strip()}"
            mutants.append(Mutant(mid, path, i + 1, line.strip(), mutated_line.strip(), mutated, tests, cpp=True))
    return mutants


# ---- the two bugs of issue 17 that the suite once missed, planted in every run -----------------------

NAMED_MUTANTS = [
    ("spark/model.py", "torch.where(sites.at(*f.shape[-2:]).mask, f, self.mask_tokens[layer].to(f.dtype))",
     "torch.where(sites.at(*f.shape[-2:]).mask, self.mask_tokens[layer].to(f.dtype), f)"),
    ("spark_kernels/reference.py", "    if count == 0:\n        return  # nothing was observed",
     "    if count <= 1:\n        return  # nothing was observed"),
]


def named_mutants() -> List[Mutant]:
    mutants = []
    for path, old, new in NAMED_MUTANTS:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        if text.count(old) != 1:
            raise SystemExit(f"named mutant of {path} no longer applies: {old!r} is not in the file exactly once")
        line = text[:text.index(old)].count("\n") + 1
        mutants.append(Mutant(f"{path}:{line}:named", path, line, old.strip().splitlines()[0], new.strip().splitlines()[0],
                              text.replace(old, new), PYTHON_TARGETS[path]))
    return mutants


# ---- running ----------------------------------------------------------------------------------------

def _copy_repo(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))
    for name in os.listdir(os.path.join(ROOT, "spark_kernels")):
        if name.startswith("_C") and name.endswith(".so"):
            shutil.copy2(os.path.join(ROOT, "spark_kernels", name), os.path.join(dest, "spark_kernels", name))


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONDONTWRITEBYTECODE="1", SPARK_KERNELS_NO_CUDA="1", MAX_JOBS="1")
    env.pop("SPARK_KERNELS_BACKEND", None)
    return env


def _run(cmd: List[str], cwd: str, timeout: float) -> Tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, tail of the output)."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    out = (p.stdout + p.stderr).strip().splitlines()
    return ("pass" if p.returncode == 0 else "fail"), time.monotonic() - t0, " | ".join(out[-3:])[-300:]


def _build_cpp(work: str) -> Tuple[str, float, str]:
    status, t1, out = _run([sys.executable, "setup.py", "build_ext", "--inplace"], work, 1800)
    if status != "pass":
        return status, t1, "extension build: " + out
    status, t2, out = _run(["bash", "-c", "cmake -S . -B build/ctest >/dev/null && cmake --build build/ctest -j1 "
                            ">/dev/null && ctest --test-dir build/ctest --output-on-failure"], work, 1800)
    return status, t1 + t2, ("ctest: " + out) if status != "pass" else ""


def run_mutants(mutants: List[Mutant], out_path: str, timeout_factor: float, rerun: bool = False,
                skip_baselines: bool = False) -> None:
    done, baseline = set(), {}
    if os.path.exists(out_path):
        with open(out_path) as f:
            for r in map(json.loads, filter(str.strip, f)):
                if "baseline" in r:  # unmutated run of a test set, kept so that a resumed run skips it
                    baseline[tuple(r["baseline"])] = r["seconds"]
                else:
                    done.add(r["id"])
    todo = [m for m in mutants if rerun or m.id not in done]
    print(f"{len(todo)} mutants to run ({len(mutants) - len(todo)} already in {out_path})", flush=True)
    if not todo:
        return
    work = tempfile.mkdtemp(prefix="spark-mutants-")
    try:
        _copy_repo(work)
        # Unmutated first: the C++ build (its extension replaces the copied one) and every test set.
        if any(m.cpp for m in todo):
            status, secs, out = _build_cpp(work)
            if status != "pass":
                raise SystemExit(f"the unmutated C++ build or ctest fails in the copy: {out}")
        for key in dict.fromkeys(tuple(m.tests) for m in todo):
            if key not in baseline and skip_baselines:
                baseline[key] = 900 / timeout_factor  # assumed passing: a 900 s limit per mutant
            if key not in baseline:
                status, secs, out = _run([sys.executable] + PYTEST + list(key), work, 3600)
                if status != "pass":
                    raise SystemExit(f"the unmutated tests fail: {list(key)}: {out}")
                baseline[key] = secs
                with open(out_path, "a") as f:
                    f.write(json.dumps(dict(baseline=list(key), seconds=round(secs, 1))) + "\n")
                print(f"baseline {secs:.0f}s: {' '.join(key)}", flush=True)
        for i, m in enumerate(todo):
            key = tuple(m.tests)
            target = os.path.join(work, m.path)
            with open(target) as f:
                original = f.read()
            with open(target, "w") as f:
                f.write(m.source)
            t0 = time.monotonic()
            try:
                status, out = "pass", ""
                if m.cpp:
                    status, _, out = _build_cpp(work)
                    if status != "pass":
                        status = "build-or-ctest-fail"
                if status == "pass":
                    limit = max(120.0, timeout_factor * baseline[key])
                    status, _, out = _run([sys.executable] + PYTEST + m.tests, work, limit)
            finally:
                with open(target, "w") as f:
                    f.write(original)
            result = "survived" if status == "pass" else "killed"
            record = dict(id=m.id, path=m.path, line=m.line, before=m.before, after=m.after, result=result,
                          how=status, seconds=round(time.monotonic() - t0, 1), output=out if result == "killed" else "")
            with open(out_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"[{i + 1}/{len(todo)}] {result:8s} {record['seconds']:6.1f}s {m.id}: {m.before!r} -> {m.after!r}",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(out_path: str, selected: List[Mutant]) -> None:
    if not os.path.exists(out_path):
        return
    ids = {m.id for m in selected}
    with open(out_path) as f:
        latest = {r["id"]: r for r in map(json.loads, filter(str.strip, f)) if r.get("id") in ids}  # last run wins
    records = list(latest.values())
    print(f"\n{len(records)} of the {len(selected)} selected mutants have results")
    by_file: Dict[str, Dict[str, int]] = {}
    for r in records:
        row = by_file.setdefault(r["path"], {"killed": 0, "survived": 0})
        row[r["result"]] += 1
    print(f"\n{'file':34s} {'mutants':>8s} {'killed':>7s} {'survived':>9s}")
    for path, row in sorted(by_file.items()):
        print(f"{path:34s} {row['killed'] + row['survived']:8d} {row['killed']:7d} {row['survived']:9d}")
    total = len(records)
    killed = sum(r["result"] == "killed" for r in records)
    print(f"{'total':34s} {total:8d} {killed:7d} {total - killed:9d}   score {killed / max(total, 1):.1%}")
    for r in records:
        if r["result"] == "survived":
            print(f"SURVIVED {r['id']}: {r['before']!r} -> {r['after']!r}")


def select(mutants: List[Mutant], budget: int, seed: int) -> List[Mutant]:
    """At most about `budget` mutants, spread over the files in proportion to how many each has (at
    least min(10, all) per file), drawn reproducibly: each file's mutants are shuffled once (seeded by
    seed and path) and the first ones taken, so a smaller budget selects a subset of a larger one."""
    by_file: Dict[str, List[Mutant]] = {}
    for m in mutants:
        by_file.setdefault(m.path, []).append(m)
    chosen = []
    for path, ms in by_file.items():
        quota = max(MIN_PER_FILE[ms[0].cpp], round(budget * len(ms) / max(len(mutants), 1)))
        order = list(ms)
        random.Random(f"{seed}:{path}").shuffle(order)
        chosen += order[:quota]
    return sorted(chosen, key=lambda m: (m.path, m.line, m.id))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python", type=int, default=DEFAULT_PYTHON_BUDGET, help="Python mutant budget")
    p.add_argument("--cpp", type=int, default=DEFAULT_CPP_BUDGET, help="C++ mutant budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", help="restrict the selection to these target files")
    p.add_argument("--ids", nargs="*", help="run exactly these mutant ids")
    p.add_argument("--rerun", action="store_true", help="with --ids: run them again even if results exist")
    p.add_argument("--list", action="store_true", help="list the selected mutants and exit")
    p.add_argument("--summary", action="store_true", help="summarize the results in --out for the selection")
    p.add_argument("--out", default=os.path.join(ROOT, "build", "mutants.jsonl"))
    p.add_argument("--timeout-factor", type=float, default=4.0)
    p.add_argument("--skip-baselines", action="store_true",
                   help="do not run the unmutated test sets first (only when they are known to pass)")
    args = p.parse_args()

    py = [m for path, tests in PYTHON_TARGETS.items() for m in python_mutants(path, tests)]
    cc = [m for path, tests in CPP_TARGETS.items() for m in cpp_mutants(path, tests)]
    print(f"enumerated {len(py)} Python and {len(cc)} C++ mutants", flush=True)
    if args.ids:
        wanted = set(args.ids)
        chosen = [m for m in named_mutants() + py + cc if m.id in wanted]
    else:
        chosen = named_mutants() + select(py, args.python, args.seed) + select(cc, args.cpp, args.seed)
    if args.only:  # the same selection as the whole run, restricted to some files
        chosen = [m for m in chosen if m.path in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id}: {m.before!r} -> {m.after!r}")
        print(f"{len(chosen)} selected")
        return
    if args.summary:
        summarize(args.out, chosen)
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run_mutants(chosen, args.out, args.timeout_factor, rerun=bool(args.ids) and args.rerun,
                skip_baselines=args.skip_baselines)
    summarize(args.out, chosen)


if __name__ == "__main__":
    main()
