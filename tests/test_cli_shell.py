"""The CLI shell: commands listed, --version, and a --help that imports neither torch nor transformers."""

import subprocess
import sys
from pathlib import Path

from lora_gpt2 import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_without_importing_torch():
    probe = ("import sys\nfrom lora_gpt2.cli import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
             "heavy = [m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules]\n"
             "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "COLUMNS": "120", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    for command in ("download-data", "train", "generate", "eval", "merge", "export", "plot"):
        assert command in out.stdout


def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "lora_gpt2", "--version"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == f"lora-gpt2 {__version__}"


def test_unknown_command_and_option_are_one_line(cli):
    code, _, err = cli("trian")
    assert code == 1 and err.strip().splitlines() == [err.strip()] and "No such command 'trian'" in err
    code, _, err = cli("train", "--rnak", "4")
    assert code == 1 and err.startswith("lora-gpt2: error: No such option: --rnak")
    assert len(err.strip().splitlines()) == 1
