"""The package's layout rules, read from the source: the library never imports the measuring harness,
the I/O layer imports no model library, and tools/ use the installed package as it is."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qlora_kit"
HEAVY = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function, with relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "bench" not in p.relative_to(PACKAGE).parts]


def test_the_library_never_imports_the_harness():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("qlora_kit.bench"))
                 for p in library_files()}
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_harness_is_found_by_the_check():  # the check above would pass vacuously if it read nothing
    assert any(m.startswith("qlora_kit.bench") for m in imported_modules(ROOT / "tools" / "bench.py"))
    assert len(library_files()) > 40


def test_the_io_layer_imports_no_model_library():
    for path in (PACKAGE / "io").glob("*.py"):
        heavy = sorted(m for m in imported_modules(path) if m.split(".")[0] in HEAVY)
        assert heavy == [], f"{path.name} imports {heavy}"


def test_tools_do_not_edit_sys_path():
    for path in (ROOT / "tools").glob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path: the package is installed"
