"""The command line: every command has --help; bad arguments give a clear error."""

import subprocess
import sys

import pytest

from sparse_mosaics.cli import COMMANDS, main


def test_top_level_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "sparse_mosaics.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: sparse-mosaics " + name in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--sections", "kernels,nope"], "unknown --sections value(s) ['nope']"),
    (["--methods", "softmax,top0_softmax"], "--methods: "),
    (["--cells", "icll512,icll9"], "unknown --cells value(s) ['icll9']"),
    (["--shapes", "4096x"], "--shapes must be comma-separated TxD pairs"),
    (["--compile", "reduce-overheads"], "--compile: unknown Inductor mode 'reduce-overheads' (valid: "),
    (["--no-eager"], "--no-eager needs --compile [MODE]"),
])
def test_bench_bad_arguments_name_the_option(args, message, capsys):
    """Checked before anything needs a GPU, so the error is the same on CPU-only machines."""
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err
