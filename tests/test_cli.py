"""The console script's command table: lazy imports, bad input as one ``error:`` line, bugs with their
traceback, and flags that do not apply to the chosen corpus executor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from gptforge.common.errors import UserError
from gptforge.launcher import cli


def test_every_table_entry_names_its_pair():
    import importlib

    for key, command in cli.COMMANDS.items():
        module_name, _, name = command.target.partition(":")
        module = importlib.import_module(module_name)
        for attribute in ((f"add_{name}_arguments", f"run_{name}") if name else ("add_arguments", "run")):
            assert callable(getattr(module, attribute)), (key, attribute)


def test_help_imports_no_command_module():
    code = ("import sys\nfrom gptforge.launcher.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('gptforge.') and m.endswith('cli')"
            " and m != 'gptforge.launcher.cli'))")
    top = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, check=True)
    assert "corpus" in top.stdout and top.stdout.strip().splitlines()[-1] == "[]"
    dedup = subprocess.run([sys.executable, "-c", code, "dedup", "--help"], capture_output=True, text=True, check=True)
    assert "--threshold" in dedup.stdout
    assert dedup.stdout.strip().splitlines()[-1] == "['gptforge.data_prep.dedup.cli']"


def test_chosen_command():
    assert cli.chosen_command(["corpus", "build", "--config", "x"]) == "corpus build"
    assert cli.chosen_command(["dedup", "a.jsonl"]) == "dedup"
    assert cli.chosen_command(["corpus", "--help"]) is None
    assert cli.chosen_command(["--help"]) is None and cli.chosen_command(["nope"]) is None


def test_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    def bad_input(args):
        raise UserError("--flag: wrong")

    def bug(args):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "load_command", lambda key: (lambda p: None, bad_input))
    assert cli.main(["dedup"]) == 2
    assert capsys.readouterr().err == "error: --flag: wrong\n"
    monkeypatch.setenv("GPTFORGE_DEBUG", "1")
    with pytest.raises(UserError):
        cli.main(["dedup"])
    monkeypatch.setattr(cli, "load_command", lambda key: (lambda p: None, bug))
    monkeypatch.delenv("GPTFORGE_DEBUG")
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["dedup"])


def test_missing_input_names_its_flag(tmp_path, capsys):
    assert cli.main(["quality", "train", "--positive", str(tmp_path / "p.jsonl"), "--negative",
                     str(tmp_path / "n.jsonl"), "-o", str(tmp_path / "q.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --positive: no such file") and "--negative: no such file" in err
    assert cli.main(["tokenize", "--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "o"),
                     "--tokenizer", str(tmp_path / "t.model")]) == 2
    assert "--tokenizer: no such file" in capsys.readouterr().err


@pytest.fixture
def corpus_config(tmp_path) -> str:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": f"document number {i} " * 20}) + "\n" for i in range(4)))
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump({"input": {"paths": [str(docs)]}, "output": {"dir": str(tmp_path / "out")},
                                    "mlflow": {"enabled": False}}))
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--executor", "slurm", "--workers", "2"], "error: --workers applies to the local executor only, not with "
                                                "--executor slurm"),
    (["--workers", "2", "executor.kind=slurm"], "error: --workers applies to the local executor only, not with "
                                                "executor.kind=slurm"),
    (["--no-wait"], "error: --no-wait applies to --executor slurm only, not with executor.kind=local"),
    (["--no-wait", "--executor", "local"], "error: --no-wait applies to --executor slurm only, not with "
                                           "--executor local"),
])
def test_corpus_flags_that_do_not_apply_are_errors(corpus_config, capsys, argv, message):
    assert cli.main(["corpus", "build", "--config", corpus_config, "--quiet", *argv]) == 2
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_config_error(write_config, capsys):
    """Reported with the config's other errors, before any process group, naming the fix."""
    assert cli.main(["train", "--config", write_config(), "train.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has 1 error(s)" in err and "Traceback" not in err
    assert "train.device is 'cuda' but no CUDA device is available" in err and "GPTFORGE_TORCH=cuda" in err
