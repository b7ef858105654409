"""The house rules: scripts are thin entry points over one package, and nothing imports a script."""

import ast
from pathlib import Path

from conftest import REPO

SCRIPTS = {p.stem for p in REPO.glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports (`from a.b import c` gives a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def package_files(name: str) -> list[Path]:
    return sorted((REPO / name).rglob("*.py"))


def test_no_script_imports_another_script_and_no_package_imports_a_script():
    for path in [*REPO.glob("*.py"), *package_files("gptlab"), *package_files("models")]:
        tops = {name.split(".")[0] for name in imported_modules(path)}
        assert not tops & (SCRIPTS - {path.stem}), f"{path.name} imports a script"


def test_models_import_nothing_of_the_machinery_but_the_error_type():
    for path in package_files("models"):
        machinery = {n for n in imported_modules(path) if n.split(".")[0] == "gptlab"}
        assert machinery <= {"gptlab.errors", "gptlab.errors.UserError"}, path


def test_the_root_holds_only_the_scripts():
    assert {"train", "evaluate", "generate", "prepare_data", "benchmark", "plot"} == SCRIPTS


def test_the_loss_is_written_once_in_the_models():
    """The trainer, the evaluation and the tasks get the loss from the model's forward."""
    for path in [*REPO.glob("*.py"), *package_files("gptlab")]:
        assert "cross_entropy" not in path.read_text() or path.name == "benchmark.py", path
