"""The package's shape: no import cycle, no file over ~500 lines, every module importable alone."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "transfusion_pytorch"
CORE = sorted(p for p in PACKAGE.glob("*.py"))


def module_name(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Package modules `path` imports anywhere (functions too), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    inside = PACKAGE in path.parents
    package = (module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]) if inside else "transfusion_pytorch"
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("transfusion_pytorch"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("transfusion_pytorch"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_no_import_cycle():
    files = sorted(PACKAGE.rglob("*.py"))
    names = {module_name(p): p for p in files}
    packages = {module_name(p) for p in files if p.name == "__init__.py"}
    # a package's __init__ is imported before any of its modules anyway: `from . import sampling`
    # depends on `sampling`, not on the package
    graph = {name: {m for m in imported_modules(path) if m in names and m != name and m not in packages} for name, path in names.items()}
    state: dict[str, str] = {}
    stack: list[str] = []

    def walk(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name)


def test_the_cycle_check_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from transfusion_pytorch.training import load_model\n")
    assert "transfusion_pytorch.training" in imported_modules(module)


def test_every_module_imports_alone():
    """Each module first in a fresh interpreter (the package's other modules not yet loaded)."""
    modules = [module_name(p) for p in sorted(PACKAGE.rglob("*.py"))]
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('transfusion_pytorch')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def test_no_package_file_over_500_lines():
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
