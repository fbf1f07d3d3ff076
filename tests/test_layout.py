"""The house's rules, read from the code: arrows run one way and every command has one shape.

``scripts/`` and ``sampling/`` (identical thin files) -> ``shd_diffusion.commands`` (one module per
command: usage docstring, ``build_parser``, ``main`` through ``cli.run_main``) -> application
(training, demo, export and its text-to-image half t2i_export) -> core. Nothing in ``shd_diffusion`` but ``commands`` imports ``commands``,
nothing in it imports the top-level ``sampling`` package, and no core module imports an application
module: otherwise the arrows would run both ways. Every console script and every thin file resolves
to a ``main`` in ``shd_diffusion.commands``. Inside core, ``families`` (one spec per model family) sits above ``models``: it
imports the model classes, no model module imports it, and it is the only place outside ``models``
that checks a model's class.
"""

from __future__ import annotations

import argparse
import ast
import importlib

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the commands are also checked by CI there

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shd_diffusion"
APPLICATION = ("shd_diffusion.training", "shd_diffusion.demo", "shd_diffusion.export", "shd_diffusion.t2i_export")
COMMANDS = "shd_diffusion.commands"
# Command lines not yet in COMMANDS (none left).
PENDING_COMMANDS: tuple[str, ...] = ()
# The thin files: python scripts/X.py, python -m sampling.X (and accelerate launch of either).
SHIMS = sorted([*(ROOT / "scripts").glob("*.py"), ROOT / "sampling" / "sample.py", ROOT / "sampling" / "score.py"])
MAX_SHIM_LINES = 15  # code lines (comments and blank lines aside), the docstring counted
FAMILIES = "shd_diffusion.families"
MODEL_CLASSES = {"DiT", "MDTv2", "DiTTransformer2DModel"}  # the classes the built-in families cover


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_the_package_never_imports_the_sampling_commands():
    offenders = {_module_name(p): sorted(n for n in _imports(p) if _within(n, "sampling"))
                 for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_core_modules_import_no_application_module():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        if any(_within(module, app) for app in (*APPLICATION, COMMANDS)):
            continue
        bad = sorted(n for n in _imports(path) for app in APPLICATION if _within(n, app))
        if bad:
            offenders[module] = bad
    assert offenders == {}


def test_only_commands_import_commands():
    """The command lines are the top of the package: application and core never call them."""
    offenders = {_module_name(p): sorted(n for n in _imports(p) if _within(n, COMMANDS))
                 for p in PACKAGE.rglob("*.py") if not _within(_module_name(p), COMMANDS)}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_families_is_core_and_sits_above_models():
    assert not any(_within(FAMILIES, app) for app in APPLICATION)  # core: the application asks it
    offenders = {_module_name(p): sorted(n for n in _imports(p) if _within(n, FAMILIES))
                 for p in (PACKAGE / "models").rglob("*.py")}
    assert {m: n for m, n in offenders.items() if n} == {}


def _family_checks(path: Path) -> list[str]:
    """``isinstance(x, <model class>)`` calls and ``type(x).__name__`` reads in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            if names & MODEL_CLASSES:
                found.append(f"line {node.lineno}: isinstance(..., {ast.unparse(node.args[1])})")
        elif (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "__name__"
              and any(isinstance(c, ast.Constant) and c.value in MODEL_CLASSES for c in node.comparators)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "startswith"
              and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "__name__"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_family_checks_outside_families_and_models():
    """Which family a model is: ``families.family_of``, not a class check in the trainer, sampler, export."""
    roots = [PACKAGE, ROOT / "sampling", ROOT / "scripts"]
    skip = (PACKAGE / "families", PACKAGE / "models")
    offenders = {str(p.relative_to(ROOT)): _family_checks(p) for root in roots for p in root.rglob("*.py")
                 if not any(p.is_relative_to(s) for s in skip)}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_family_check_rule_sees_a_class_check(monkeypatch):
    code = 'isinstance(model, (DiT, MDTv2))\ntype(m).__name__.startswith("MDT")\ntype(m).__name__ != "DiT"\n'
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: code)
    assert len(_family_checks(PACKAGE / "sampler.py")) == 3


def test_the_rule_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a relative import of the trainer from a core module is caught."""
    fake = PACKAGE / "shd" / "_probe_layout.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from ..training import Trainer\n")
    assert "shd_diffusion.training.Trainer" in _imports(fake)


def _private_shd_imports(path: Path) -> list[str]:
    """Underscore names ``path`` imports from a module of ``shd_diffusion.shd``."""
    return sorted(n for n in _imports(path) if _within(n, "shd_diffusion.shd") and n.rpartition(".")[2].startswith("_"))


def test_no_private_name_crosses_the_shd_modules():
    """The SHD package by role (issue 21): what one module shares with another is public in its owner."""
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    offenders = {str(p.relative_to(ROOT)): _private_shd_imports(p) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def _private_package_imports(path: Path) -> list[str]:
    """Underscore names ``path`` imports from any module of ``shd_diffusion`` (dunders aside)."""
    return sorted(n for n in _imports(path) if _within(n, "shd_diffusion")
                  and n.rpartition(".")[2].startswith("_") and not n.rpartition(".")[2].startswith("__"))


def test_no_private_name_crosses_modules_of_the_package():
    """What one module of the package (or a benchmark) uses from another is public in its owner."""
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    offenders = {str(p.relative_to(ROOT)): _private_package_imports(p) for p in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_private_import_rule_sees_one(monkeypatch):
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from .solve import _objective, check_ridge\n")
    assert _private_shd_imports(PACKAGE / "shd" / "chunked.py") == ["shd_diffusion.shd.solve._objective"]


def _console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def _is_command(module: str) -> bool:
    return (_within(module, COMMANDS) and module != COMMANDS) or module in PENDING_COMMANDS


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_console_command_resolves_to_a_command_main(name):
    module, _, attr = _console_scripts()[name].partition(":")
    assert _is_command(module) and attr == "main", f"{name} = {module}:{attr}: point it at shd_diffusion.commands.*:main"
    assert callable(getattr(importlib.import_module(module), attr))


def _shim_problems(path: Path) -> list[str]:
    """How a thin entry file departs from the one shape: a docstring, ``import sys``, ``from <command
    module> import main``, ``if __name__ == "__main__": sys.exit(main())``; at most MAX_SHIM_LINES."""
    text = path.read_text()
    tree = ast.parse(text)
    body = tree.body
    problems = []
    code_lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(code_lines) > MAX_SHIM_LINES:
        problems.append(f"{len(code_lines)} code lines > {MAX_SHIM_LINES}: move the logic into shd_diffusion")
    if ast.get_docstring(tree) is None:
        problems.append("no docstring naming the command and its module")
    statements = body[1:] if ast.get_docstring(tree) is not None else body
    shape = [type(node).__name__ for node in statements]
    if shape != ["Import", "ImportFrom", "If"]:
        problems.append(f"statements {shape}, expected [Import, ImportFrom, If]")
        return problems
    sys_import, main_import, guard = statements
    if [a.name for a in sys_import.names] != ["sys"]:
        problems.append("the import is not `import sys`")
    if not (_is_command(main_import.module or "") and [(a.name, a.asname) for a in main_import.names] == [("main", None)]):
        problems.append(f"imports {ast.unparse(main_import)}: expected `from shd_diffusion.commands.<name> import main`")
    if ast.unparse(guard) != "if __name__ == '__main__':\n    sys.exit(main())":
        problems.append(f"ends with {ast.unparse(guard)!r}, expected `if __name__ == \"__main__\": sys.exit(main())`")
    return problems


def _shim_target(path: Path) -> str | None:
    """The module whose ``main`` a thin file runs (None when it has not the thin shape)."""
    imports = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ImportFrom)]
    return imports[0].module if len(imports) == 1 else None


@pytest.mark.parametrize("path", SHIMS, ids=[p.relative_to(ROOT).as_posix() for p in SHIMS])
def test_every_entry_file_is_the_same_thin_shape(path):
    assert _shim_problems(path) == []
    assert callable(importlib.import_module(_shim_target(path)).main)


def test_the_shim_rule_sees_logic(monkeypatch):
    """The checker itself: a thin file that parses its own flags is refused."""
    code = ('"""x"""\nimport argparse\nimport sys\nfrom shd_diffusion.commands.sample import main\n'
            'p = argparse.ArgumentParser()\nif __name__ == "__main__":\n    sys.exit(main())\n')
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: code)
    assert _shim_problems(ROOT / "scripts" / "probe.py")


def _commands() -> list[Path]:
    return sorted(p for p in (PACKAGE / "commands").glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", _commands(), ids=[p.stem for p in _commands()])
def test_every_command_module_has_the_one_shape(path):
    """Usage lines in the docstring, ``build_parser() -> ArgumentParser``, ``main(argv=None) -> int``
    ending in ``run_main`` (one ``error:`` line, exit 2, ``--debug``), and a thin file that runs it."""
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    assert "python " in doc, "the docstring shows how the command is run"
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"build_parser", "main"} <= set(functions)
    assert [a.arg for a in functions["build_parser"].args.args] == []
    main = functions["main"]
    assert [a.arg for a in main.args.args] == ["argv"] and ast.unparse(main.args.defaults[0]) == "None"
    assert ast.unparse(main.returns) == "int"
    calls = {ast.unparse(n.func) for n in ast.walk(main) if isinstance(n, ast.Call)}
    assert "run_main" in calls, "main runs its body through shd_diffusion.cli.run_main"
    module = importlib.import_module(_module_name(path))
    assert isinstance(module.build_parser(), argparse.ArgumentParser)
    run_by = [p for p in SHIMS if _shim_target(p) == module.__name__]
    assert run_by, f"no file in scripts/ or sampling/ runs {module.__name__}"
