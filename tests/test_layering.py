"""The import layering of docs/design.md: every import of the product points down, never up.

    schemas  <  transforms.lib  <  transforms (Beam stages), model  <  pipelines

Read from the source (every `import`, at module level or inside a function), so an import that
only runs on one code path is held to the rule as well. A function-level import says why it is
lazy (`# lazy: ...` on it or on the comment lines just above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "transforms", "model", "pipelines")


def layer(module: str) -> str:
    """The layer a project module belongs to (docs/design.md, "Layers")."""
    if module.startswith("transforms.lib.") or module == "transforms.lib":
        return "lib"
    return module.split(".")[0]


# What each layer may import from the project (besides itself); "beam" marks apache_beam.
ALLOWED = {
    "schemas": {"schemas"},
    "lib": {"schemas", "lib"},
    "transforms": {"schemas", "lib", "transforms", "beam"},
    "model": {"schemas", "lib", "model"},
    "pipelines": {"schemas", "lib", "transforms", "model", "pipelines", "beam"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    found: list[tuple[int, str, bool]] = []  # one entry per (line, module): `from a import b, c` is one

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    package = me.split(".")[: -child.level] if path.name != "__init__.py" else me.split(".")
                    base = ".".join([*package, *([base] if base else [])])
                # `from pkg import mod` imports the submodule pkg.mod where one exists
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or (
                        ROOT / sub.replace(".", "/") / "__init__.py"
                    ).exists()
                    found.append((child.lineno, sub if is_module else base, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return sorted(set(found))


def target_layer(module: str) -> str | None:
    top = module.split(".")[0]
    if top == "apache_beam":
        return "beam"
    return layer(module) if top in PACKAGES else None


def violations(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        me = module_name(path)
        mine = layer(me)
        for line, module, _ in imports(path):
            target = target_layer(module)
            if target is None or target == mine:
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if target not in ALLOWED[mine]:
                found.append(f"{where}: {me} ({mine}) imports {module} ({target})")
            elif module.startswith("pipelines.demo") and not (me == "pipelines.cli" or me.startswith("pipelines.demo")):
                found.append(f"{where}: {me} imports the demo ({module}); only pipelines.cli may")
    return found


def unexplained_lazy_imports(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        lines = path.read_text().splitlines()
        for line, module, in_function in imports(path):
            if not in_function:
                continue
            i, said = line - 1, False
            while i >= 0 and not said:
                text = lines[i].strip()
                said = "lazy" in text and "#" in text
                if i < line - 1 and not (text.startswith("#") or text.startswith(("import ", "from "))):
                    break
                i -= 1
            if not said:
                found.append(
                    f"{path.relative_to(ROOT)}:{line}: `{module}` imported inside a function without `# lazy: why`"
                )
    return found


def test_every_import_points_down():
    assert product_modules(), "no product modules found"
    bad = violations(product_modules())
    assert not bad, "imports against the layering (docs/design.md):\n" + "\n".join(bad)


def test_function_level_imports_say_why():
    bad = unexplained_lazy_imports(product_modules())
    assert not bad, "function-level imports need a reason:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from pipelines import options\n", "imports pipelines.options (pipelines)"),
        ("import apache_beam as beam\n", "imports apache_beam (beam)"),
        ("def f():\n    from transforms import embed  # lazy: test\n", "imports transforms.embed (transforms)"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    """A library module that imports upward is reported, wherever the import sits."""
    fake_root = tmp_path
    for pkg in PACKAGES:
        (fake_root / pkg).mkdir()
    (fake_root / "pipelines" / "options.py").write_text("")
    (fake_root / "transforms" / "embed.py").write_text("")
    (fake_root / "transforms" / "lib").mkdir()
    bad_module = fake_root / "transforms" / "lib" / "bad.py"
    bad_module.write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake_root)
    found = violations([bad_module])
    assert len(found) == 1 and expected in found[0], found
