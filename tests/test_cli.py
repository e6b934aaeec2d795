"""The zhtune command: fast help, lazy subcommands, clear messages for missing extras and bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from zhtune.cli import COMMANDS, main


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_help_imports_nothing_heavy():
    r = run_py(
        """
        import sys
        from zhtune.cli import main
        main(["--help"])
        heavy = [m for m in ("torch", "transformers", "peft", "datasets") if m in sys.modules]
        print("HEAVY", heavy)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    for name in COMMANDS:
        assert name in r.stdout


def test_every_command_module_has_cli():
    import importlib

    for _name, (module, _extra, _help) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(getattr(mod, "cli", None)), f"{module} has no cli(argv)"


def test_unknown_command_suggests(capsys):
    assert main(["sfft"]) == 2
    assert "did you mean sft?" in capsys.readouterr().err


def test_missing_extra_breaks_only_its_command(tmp_path, monkeypatch, capsys):
    # a command whose module needs a package that is not installed fails alone, naming the extra
    (tmp_path / "fakecmd.py").write_text("import not_installed_pkg_xyz\n\ndef cli(argv):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "fake", ("fakecmd", "serve", "needs an extra"))
    assert main(["fake"]) == 3
    err = capsys.readouterr().err
    assert "not_installed_pkg_xyz" in err and "pip install 'zhtune[serve]'" in err
    # the other commands still dispatch
    assert main(["sft", "--lora_rank", "0"]) == 2


def test_require_names_the_extra(monkeypatch):
    import pytest

    from zhtune import deps
    from zhtune.errors import MissingDependency

    monkeypatch.setitem(deps.OPTIONAL, "zz_missing_mod", ("gpu", "zz-missing"))
    with pytest.raises(
        MissingDependency, match=r"zz_missing_mod is needed for a test .*pip install 'zhtune\[gpu\]'"
    ):
        deps.require("zz_missing_mod", "a test")


def test_config_errors_exit_2_with_message(capsys):
    assert main(["sft", "--lora_rank", "0"]) == 2
    assert "--lora_rank must be positive" in capsys.readouterr().err


def test_sft_help_lists_options(capsys):
    try:
        main(["sft", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "--per_device_train_batch_size" in out and "--template" in out
