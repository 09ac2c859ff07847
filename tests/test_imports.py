"""Import every module and run ``bnsurgery --help`` with the optional packages blocked; check
the package's import graph.

``import bnsurgery`` must import torch and nothing else heavy, and the command line must start
(and fail clearly, naming the extra to install) where onnx, onnxruntime and torch-tensorrt are
missing. Each check runs in a fresh interpreter so that nothing already imported by the test
session hides a module-level import.

The import graph is read from the source (every ``import`` statement, including the lazy ones
inside functions): dependencies must run one way (no cycle), and no module may import another
module's private (underscore) name.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bnsurgery

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(f"bnsurgery.{m.name}" for m in pkgutil.iter_modules(bnsurgery.__path__))
HEAVY = ("onnx", "onnxruntime", "onnxscript", "torch_tensorrt", "matplotlib", "torchvision",
         "timm", "safetensors")

# Installed before anything else in the child interpreter: any import of a blocked package
# raises ImportError, exactly as if it were not installed.
BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"onnx", "onnxruntime", "torch_tensorrt"}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {name!r} (blocked for this test)")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, check=False)


def test_every_module_is_covered():
    for expected in ("cli", "demo", "divergence", "onnx_export", "models", "ort_session", "report",
                     "tensorrt", "validate"):
        assert f"bnsurgery.{expected}" in MODULES


def test_importing_imports_nothing_heavy():
    result = _python(textwrap.dedent(f"""
        import importlib, json, sys
        for name in {MODULES!r}:
            importlib.import_module(name)
        print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_help_and_clear_errors_with_optional_packages_blocked():
    result = _python(BLOCKER + textwrap.dedent(f"""
        import importlib, io, json, contextlib, runpy
        import torch
        for name in {MODULES!r}:
            importlib.import_module(name)

        codes = {{}}
        for argv in (["--help"], *[[c, "--help"] for c in
                     ("demo", "inspect", "replace", "fuse", "export", "validate")]):
            sys.argv = ["bnsurgery", *argv]
            with contextlib.redirect_stdout(io.StringIO()) as out:
                try:
                    runpy.run_module("bnsurgery", run_name="__main__", alter_sys=True)
                except SystemExit as exc:
                    codes[" ".join(argv)] = (exc.code, "usage: bnsurgery" in out.getvalue())

        from bnsurgery.errors import MissingDependencyError
        from bnsurgery.onnx_export import export_onnx
        from bnsurgery.validate import validate_onnx
        from bnsurgery.tensorrt import validate_tensorrt
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).eval()
        x = torch.randn(2, 3, 8, 8)
        messages = []
        for call in (lambda: export_onnx(model, x, "unused.onnx", fuse=False),
                     lambda: validate_onnx(model, "unused.onnx", x, providers="cpu")):
            try:
                call()
            except MissingDependencyError as exc:
                messages.append(str(exc))
        skipped = validate_tensorrt(model, x)

        with contextlib.redirect_stdout(io.StringIO()), \\
                contextlib.redirect_stderr(io.StringIO()) as err:
            from bnsurgery.cli import main
            cli_code = main(["export", "torch.nn:Identity", "-o", "unused.onnx",
                             "--input-shape", "2,3,8,8"])
        print(json.dumps({{"codes": codes, "messages": messages, "cli": cli_code,
                          "cli_err": err.getvalue(), "skipped": skipped.status,
                          "passed": skipped.passed}}))
    """))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout.splitlines()[-1])
    assert len(document["codes"]) == 7
    assert all(code == [0, True] for code in document["codes"].values()), document["codes"]
    assert len(document["messages"]) == 2
    for message in document["messages"]:
        assert "pip install 'bnsurgery'" in message and "blocked for this test" in message
    assert document["cli"] == 2
    assert "pip install" in document["cli_err"] and "Traceback" not in document["cli_err"]
    assert document["skipped"].startswith("skipped:") and document["passed"] is False
    assert not (ROOT / "unused.onnx").exists()


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "bnsurgery", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    for command in ("demo", "inspect", "replace", "fuse", "export", "validate"):
        assert command in result.stdout


# ------------------------------------------------------------------------------- import graph

def import_graph(folder: Path, package: str) -> tuple[dict[str, set[str]],
                                                     list[tuple[str, str, str]]]:
    """Module -> the package's modules it imports, and every private name imported across.

    Every import statement counts, at module level or inside a function (a lazy import is still
    a dependency). ``from package import name`` is an edge to the submodule ``name`` when there
    is one, else to the package's ``__init__``.
    """
    modules = {f"{package}.{p.stem}" if p.stem != "__init__" else package: p
               for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private: list[tuple[str, str, str]] = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:  # relative: resolved against the package
                    source = f"{package}.{source}".rstrip(".") if source else package
                if source not in modules:
                    continue
                for alias in node.names:
                    target = f"{source}.{alias.name}"
                    if source == package and target in modules:
                        graph[name].add(target)
                        continue
                    graph[name].add(source)
                    if alias.name.startswith("_") and not alias.name.startswith("__") \
                            and source != name:
                        private.append((name, source, alias.name))
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None`` when the graph has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


# The BatchNorm kernels in functional.py are being given public names; until then
# sync_batchnorm.py reuses them. No other private import is accepted.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def test_the_graph_checks_can_fail(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("from pkg.b import helper\n")
    (folder / "b.py").write_text("def helper():\n    from pkg import a\n    return a\n")
    (folder / "c.py").write_text("from . import a\nfrom .b import _hidden, __doc__\n")
    graph, private = import_graph(folder, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"},
                     "pkg.c": {"pkg.a", "pkg.b"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]  # found through the lazy import
    assert private == [("pkg.c", "pkg.b", "_hidden")]
    del graph["pkg.b"]
    assert find_cycle(graph) is None


def test_bnsurgery_imports_run_one_way():
    graph, _ = import_graph(ROOT / "bnsurgery", "bnsurgery")
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_export_and_tensorrt_do_not_depend_on_validation():
    graph, _ = import_graph(ROOT / "bnsurgery", "bnsurgery")

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in graph[todo.pop()] - seen:
                seen.add(target)
                todo.append(target)
        return seen

    for stage in ("bnsurgery.onnx_export", "bnsurgery.tensorrt", "bnsurgery.fusion_check"):
        assert "bnsurgery.validate" not in reachable(stage), stage
    batchnorm_stack = {"bnsurgery.errors", "bnsurgery._bn_registry", "bnsurgery.batchnorm",
                       "bnsurgery.sync_batchnorm", "bnsurgery.functional",
                       "bnsurgery.autograd_function", "bnsurgery.kernels"}
    assert {name for name in reachable("bnsurgery.tensors")
            if not name.startswith("bnsurgery.kernel_")} <= batchnorm_stack


def test_no_private_name_is_imported_across_modules():
    _, private = import_graph(ROOT / "bnsurgery", "bnsurgery")
    unexpected = [p for p in private if p[:2] not in KNOWN_PRIVATE_IMPORTS]
    assert unexpected == [], unexpected


def test_help_imports_no_torch():
    # ``bnsurgery --help`` answers before torch is imported: the parser and ``main`` import
    # nothing heavy and ``import bnsurgery`` is lazy (PEP 562).
    result = _python(textwrap.dedent("""
        import contextlib, io, json, sys
        from bnsurgery.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            codes = [main(["--help"]), main(["--version"]),
                     *[main([c, "--help"]) for c in ("demo", "inspect", "replace", "fuse",
                                                     "export", "validate", "recalibrate")]]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "onnx"))
        print(json.dumps({"codes": codes, "heavy": heavy, "usage": out.getvalue().count(
            "usage: bnsurgery")}))
    """))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout.splitlines()[-1])
    assert document["codes"] == [0] * 9
    assert document["usage"] == 8  # --version prints no usage
    assert document["heavy"] == []


def test_python_dash_m_help_imports_no_torch():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "bnsurgery", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == 0, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    assert "bnsurgery.cli" in imported  # the -X importtime listing is really there
    assert not [name for name in imported if name.split(".")[0] == "torch"]


def test_package_is_lazy_and_complete():
    import ast
    import importlib

    assert bnsurgery.__all__ == sorted(bnsurgery.__all__)
    tree = ast.parse((ROOT / "bnsurgery" / "__init__.py").read_text())
    # What type checkers see (the TYPE_CHECKING imports) is what the lazy attributes return.
    checked = {alias.name: f"bnsurgery.{node.module.split('.', 1)[1]}"
               for block in tree.body if isinstance(block, ast.If)
               for node in block.body if isinstance(node, ast.ImportFrom)
               for alias in node.names}
    assert sorted(checked) == bnsurgery.__all__
    for name, module in checked.items():
        assert getattr(bnsurgery, name) is getattr(importlib.import_module(module), name), name
    assert set(bnsurgery.__all__) <= set(dir(bnsurgery))
    assert bnsurgery.fuse.fuse_batchnorm is bnsurgery.fuse_batchnorm  # submodules still resolve
    with pytest.raises(AttributeError, match="no attribute 'fuse_batchnorms'"):
        bnsurgery.fuse_batchnorms  # noqa: B018

    result = _python("import sys, bnsurgery; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
