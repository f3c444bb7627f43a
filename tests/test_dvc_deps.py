"""dvc.yaml's deps cannot drift from the code: every project file a stage's script imports
(transitively, read from the source with `ast`) and every package asset those modules name must be
a dep of that stage, or editing it would leave results that `dvc status` calls up to date."""
import ast
from pathlib import Path

import pytest
import yaml

from project import ROOT

PACKAGE = "clipdistill"


def module_file(root: Path, name: str) -> Path | None:
    """The file of module `name` inside `root` (a module or a package's __init__), or None."""
    base = root / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name `path` (module `name`) imports, anywhere in its body, relative ones resolved;
    `from m import x` yields m and m.x (x may be a submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def import_closure(root: Path, script: Path) -> set[Path]:
    """The script and every project module it imports, transitively, with the __init__.py of
    every package on the way (Python runs those too)."""
    files, todo = set(), [(script, "__main__")]
    while todo:
        path, name = todo.pop()
        if path in files:
            continue
        files.add(path)
        for imported in imported_names(path, name):
            if imported.split(".")[0] != PACKAGE:
                continue
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):  # clipdistill, clipdistill.x, ...
                f = module_file(root, ".".join(parts[:i]))
                if f is not None and f not in files:
                    todo.append((f, module_name(root, f)))
    return files


def string_constants(path: Path) -> set[str]:
    """The string literals of a module's code (docstrings and comments excluded)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return {n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


def named_assets(root: Path, files: set[Path]) -> set[Path]:
    """Package asset files whose names appear in a string literal of `files` (the data they read)."""
    assets = sorted((root / PACKAGE / "assets").glob("*"))
    strings = set().union(*(string_constants(f) for f in files))
    return {a for a in assets if any(a.name in s for s in strings)}


def missing_deps(root: Path, dvc: dict) -> dict[str, list[str]]:
    """{stage: files its script imports or reads that its deps do not cover}."""
    out = {}
    for stage, spec in dvc["stages"].items():
        script = next(w for w in spec["cmd"].split() if w.endswith(".py"))
        deps = [str(d).rstrip("/") for d in spec.get("deps", [])]
        closure = import_closure(root, root / script)
        needed = closure | named_assets(root, closure)

        def covered(f):
            rel = f.relative_to(root).as_posix()
            return any(rel == d or rel.startswith(d + "/") for d in deps)

        missing = sorted(f.relative_to(root).as_posix() for f in needed if not covered(f))
        if missing:
            out[stage] = missing
    return out


def test_every_stage_depends_on_every_module_it_imports_and_asset_it_reads():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert missing_deps(ROOT, dvc) == {}


@pytest.mark.parametrize("dropped", ["clipdistill/runtime.py", "clipdistill/params.py", "clipdistill/__init__.py"])
def test_a_dropped_dep_is_caught(dropped):
    """Every stage imports runtime and params (and so the package __init__): dropping either from a
    stage's deps is reported, for that stage only."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    dvc["stages"]["distill"]["deps"].remove(dropped)
    assert missing_deps(ROOT, dvc) == {"distill": [dropped]}


def test_transitive_and_lazy_imports_count(tmp_path):
    """A module imported only inside a function of a module the script imports is in the closure,
    and so is an asset named only there."""
    pkg = tmp_path / PACKAGE
    (pkg / "assets").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "assets" / "words.txt").write_text("a\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("WORDS = 'words.txt'\n")
    (tmp_path / "stage.py").write_text("from clipdistill.a import f\n")
    closure = import_closure(tmp_path, tmp_path / "stage.py")
    assert {p.relative_to(tmp_path).as_posix() for p in closure} == {
        "stage.py", "clipdistill/__init__.py", "clipdistill/a.py", "clipdistill/b.py"}
    assert named_assets(tmp_path, closure) == {pkg / "assets" / "words.txt"}


if __name__ == "__main__":  # print what each stage's deps must add: python tests/test_dvc_deps.py
    for stage, files in missing_deps(ROOT, yaml.safe_load((ROOT / "dvc.yaml").read_text())).items():
        print(f"{stage}: {' '.join(files)}")
