"""The commands the README and docs/ show run as written.

Every ```bash block is read; each command's flags go through the real entry point's argument
parser (nothing else runs), training commands also through ``--dry-run`` (config file, dotted
overrides and the run folder resolved, nothing written), and scripts run with ``bash`` exist.
A renamed flag, a dropped script or an override key that no longer exists fails here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Entry points as the docs name them -> the module whose ``main(argv)`` they run (the thin files
# in scripts/ and sampling/ import it; test_layout.py holds them to that shape).
MODULES = {
    "scripts/train_mdt_shd.py": "shd_diffusion.commands.train",
    "scripts/demo.py": "shd_diffusion.commands.demo",
    "scripts/export.py": "shd_diffusion.commands.export",
    "scripts/extract_latents.py": "shd_diffusion.commands.extract_latents",
    "scripts/inspect_checkpoint.py": "shd_diffusion.commands.inspect_checkpoint",
    "scripts/convert_inception.py": "shd_diffusion.commands.convert_inception",
    "sampling.sample": "shd_diffusion.commands.sample",
    "sampling.score": "shd_diffusion.commands.score",
}
TRAINING = "scripts/train_mdt_shd.py"


def shell_commands(text: str) -> list[str]:
    """The commands of a page's ```bash blocks: comments dropped, backslash continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def entry_and_args(command: str) -> tuple[str, list[str]]:
    """("scripts/x.py" or "sampling.y" or "bash:path" or "pip"/..., its arguments)."""
    words = shlex.split(command)
    if words[0] == "bash":
        return f"bash:{words[1]}", words[2:]
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
        while words and words[0].startswith("--"):  # launcher flags such as --num_processes 2
            words = words[2:]
    elif words[0] in ("python", "python3"):
        words = words[1:]
    else:
        return words[0], words[1:]  # pip, python3 -m venv ...: setup lines, not checked here
    if words[0] == "-m":
        return words[1], words[2:]
    return words[0], words[1:]


def documented() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), c) for page in PAGES for c in shell_commands(page.read_text())]


class _Parsed(Exception):
    pass


def _main_of(entry: str):
    if entry in MODULES:
        return importlib.import_module(MODULES[entry]).main
    spec = importlib.util.spec_from_file_location(Path(entry).stem, ROOT / entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_docs_show_the_commands_of_every_quickstart_step():
    entries = {entry_and_args(c)[0] for _, c in documented()}
    assert {TRAINING, "sampling.sample", "sampling.score", "scripts/export.py", "scripts/extract_latents.py",
            "bash:scripts/demo.sh", "bash:.ci/run"} <= entries


def test_the_table_names_what_each_entry_file_runs():
    for entry, module in MODULES.items():
        path = ROOT / (entry if entry.endswith(".py") else entry.replace(".", "/") + ".py")
        assert f"from {module} import main\n" in path.read_text(), entry
    assert {f"scripts/{p.name}" for p in (ROOT / "scripts").glob("*.py")} <= set(MODULES)


def test_the_command_reader_sees_a_wrong_flag(monkeypatch):
    """The checker itself: a flag the parser does not know is caught, a known one passes."""
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _raising_parse_args())
    with pytest.raises(_Parsed):
        _main_of("sampling.score")(["a.npz", "--ref", "b.npz"])
    with pytest.raises(SystemExit):
        _main_of("sampling.score")(["a.npz", "--no-such-flag"])


def _raising_parse_args():
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    return parse_and_stop


@pytest.mark.parametrize("page, command", documented(), ids=[f"{p}:{entry_and_args(c)[0]}" for p, c in documented()])
def test_documented_command_runs_as_written(page, command, monkeypatch, capsys):
    entry, args = entry_and_args(command)
    if entry.startswith("bash:"):
        assert (ROOT / entry.removeprefix("bash:")).is_file(), f"{page}: {command}"
        return
    if not (entry in MODULES or entry.endswith(".py")):
        return  # environment setup (pip, venv)
    monkeypatch.chdir(ROOT)
    if entry == TRAINING:
        assert _main_of(entry)([*args, "--dry-run"]) == 0, f"{page}: {command}"
        assert "# run folder:" in capsys.readouterr().out
        return
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", _raising_parse_args())
    with pytest.raises(_Parsed):
        _main_of(entry)(args)
