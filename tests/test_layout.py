"""The house's rules, read from the code: arrows run one way and every console command resolves.

scripts -> application (training, demo, export; the ``sampling`` commands) -> core. A core module
that imported an application module, or anything in ``shd_diffusion`` that imported the top-level
``sampling`` package, would make the arrows run both ways. Inside core, ``families`` (one spec per
model family) sits above ``models``: it imports the model classes, no model module imports it, and
it is the only place outside ``models`` that checks a model's class.
"""

from __future__ import annotations

import ast
import importlib

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the commands are also checked by CI there

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shd_diffusion"
APPLICATION = ("shd_diffusion.training", "shd_diffusion.demo", "shd_diffusion.export")
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
        if any(_within(module, app) for app in APPLICATION):
            continue
        bad = sorted(n for n in _imports(path) for app in APPLICATION if _within(n, app))
        if bad:
            offenders[module] = bad
    assert offenders == {}


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


def test_the_private_import_rule_sees_one(monkeypatch):
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "from .solve import _objective, check_ridge\n")
    assert _private_shd_imports(PACKAGE / "shd" / "chunked.py") == ["shd_diffusion.shd.solve._objective"]


def _console_scripts() -> dict[str, str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(_console_scripts()))
def test_every_console_command_resolves_to_a_function(name):
    module, _, attr = _console_scripts()[name].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
