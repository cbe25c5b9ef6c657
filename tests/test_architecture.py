"""The package's shape, checked: layers import only downwards, every package says what it is for,
the CLI answers --help without the heavy libraries, error kinds map to their exit codes, and the
Python API drives the same objects as the CLI."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "distill"
# Lowest first: a module may import from its own package and from any package listed before it.
LAYERS = ["errors", "util", "formulas", "runtime", "tokens", "interpolation", "config", "data", "models",
          "caches", "signals", "evaluation", "tasks", "exporting", "run", "api", "cli", "demo", "__init__"]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "distill":
            if node.module == "distill":
                yield from (alias.name for alias in node.names)
            else:
                yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from (alias.name.split(".")[1] for alias in node.names
                        if alias.name.startswith("distill.") and alias.name.count(".") >= 1)


def _layer(path: Path) -> str:
    first = path.relative_to(PACKAGE).parts[0]
    return first[:-3] if first.endswith(".py") else first


def test_every_module_imports_only_its_own_package_or_a_lower_layer():
    upward = []
    modules = [p for p in PACKAGE.rglob("*.py") if "metrics" not in p.relative_to(PACKAGE).parts[:2] or
               p.relative_to(PACKAGE).parts[:2] != ("evaluation", "metrics")]
    for path in modules:
        own = _layer(path)
        assert own in LAYERS, f"{path.relative_to(ROOT)}: package {own!r} has no place in LAYERS"
        for imported in _imports(path):
            if imported != own and LAYERS.index(imported) > LAYERS.index(own):
                upward.append(f"{path.relative_to(ROOT)} imports distill.{imported}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_every_sub_package_has_a_one_line_purpose_and_no_flat_modules_are_left():
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and doc.strip(), f"{folder.name}/__init__.py says nothing of what the package is for"
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "api.py", "cli.py", "errors.py"], flat


def test_help_answers_without_importing_torch_transformers_or_deepspeed():
    probe = ("import sys\nfrom distill.cli import main\n"
             "for words in (['--help'], ['train', '--help'], ['cache', '--help']):\n"
             "    try:\n        main(words)\n    except SystemExit as stop:\n        assert stop.code == 0\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    assert "usage: distill" in result.stdout and "--store" in result.stdout


def test_each_error_kind_has_its_exit_code_and_the_cli_reports_it_in_one_line(monkeypatch, capsys):
    from distill import cli, errors

    assert errors.exit_codes() == {"ConfigError": 2, "ExportError": 2, "NonFiniteLogitsError": 3,
                                   "CheckpointWriteError": 4, "DivergedError": 5,
                                   "ServedTeacherError": 6}
    for kind in errors.DistillError.__subclasses__():
        def fail(args, kind=kind):
            raise kind("what went wrong: how to fix it")

        monkeypatch.setitem(cli.COMMANDS, "export", cli.Command("x", cli._export_arguments, fail))
        assert cli.main(["export", "run", "out"]) == kind.exit_code
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"distill: {kind.label}: what went wrong: how to fix it"], err


def test_an_unknown_command_or_stray_word_is_refused_by_the_parser(capsys):
    from distill import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["frobnicate"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "config.yaml", "--stray"])
    assert stop.value.code == 2 and "unrecognized arguments: --stray" in capsys.readouterr().err


def test_the_cli_train_command_calls_the_api_with_the_parsed_config(monkeypatch, tmp_path):
    """The CLI is a thin layer: `distill train CONFIG k=v --weights F` is api.load_config + api.train."""
    from distill import api, cli

    seen = {}
    monkeypatch.setattr(api, "load_config", lambda path, overrides, fragments=(): seen.update(
        path=path, overrides=overrides, fragments=fragments) or "CFG")
    monkeypatch.setattr(api, "train", lambda cfg: seen.update(cfg=cfg))
    assert cli.main(["train", "c.yaml", "training.max_steps=3", "--weights", "w.yaml", "seed=2"]) == 0
    assert seen == {"path": "c.yaml", "overrides": ["training.max_steps=3", "seed=2"], "fragments": ["w.yaml"],
                    "cfg": "CFG"}


def test_every_teacher_signal_source_lives_in_signals():
    """issue 28: a Source or Signal subclass defined anywhere but distill/signals/ is a protocol leak."""
    import inspect

    import distill.signals.base as base
    from distill.tasks import task_class

    for name in ("sequence_classification", "causal_lm", "token_classification"):
        task_class(name)  # imports every source a task uses
    import sys

    found = []
    for module in [m for m in list(sys.modules.values()) if getattr(m, "__name__", "").startswith("distill.")]:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, (base.Source, base.Signal)) and cls.__module__ == module.__name__:
                found.append(cls.__module__)
    assert found and all(module.startswith("distill.signals.") for module in found), sorted(set(found))
