"""``novacron completion bash|zsh``: generated from the argparse tree, and real shells complete with it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from novacron.cli.completion import script, tree
from novacron.cli.main import build_parser
from tests.unit.test_cli_help import walk


def _paths() -> set[str]:
    return {path for path, _ in walk(build_parser(), "novacron")}


def test_every_subcommand_and_flag_is_in_the_tables() -> None:
    nodes = dict(tree(build_parser()))
    assert set(nodes) == _paths()  # every (nested) subcommand has its entry
    for path, parser in walk(build_parser(), "novacron"):
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in nodes[path].words, f"{path} {opt}"
    assert "create" in nodes["novacron vm"].words and "--memory-mb" in nodes["novacron vm create"].words
    assert nodes["novacron vm create"].choices["--accel"] == ["auto", "kvm", "tcg"]
    assert "--to" in nodes["novacron migrate"].valued and "--json" not in nodes["novacron migrate"].valued
    for shell in ("bash", "zsh"):
        text = script(shell, build_parser())
        for path in _paths():
            assert f"['{path}']" in text or f"[{path}]" in text, (shell, path)


def _write(tmp_path: Path, shell: str) -> Path:
    path = tmp_path / f"novacron.{shell}"
    path.write_text(script(shell, build_parser()))
    return path


def _bash(tmp_path: Path, *words: str) -> list[str]:
    """Source the script in a real bash, then complete ``words`` (the last is being typed)."""
    comp = _write(tmp_path, "bash")
    quoted = " ".join(f"'{w}'" for w in words)
    res = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c",
         f'source {comp} && complete -p novacron && COMP_WORDS=({quoted}) && '
         f'COMP_CWORD={len(words) - 1} && _novacron && printf "%s\\n" "${{COMPREPLY[@]}}"'],
        capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "complete -F _novacron novacron", lines  # registered for the command
    return [line for line in lines[1:] if line]


def test_bash_completes_subcommands_flags_and_choices(tmp_path: Path) -> None:
    assert _bash(tmp_path, "novacron", "mig") == ["migrations", "migrate", "migration"]
    assert _bash(tmp_path, "novacron", "vm", "cr") == ["create"]
    assert _bash(tmp_path, "novacron", "migration", "p") == ["policies"]
    assert _bash(tmp_path, "novacron", "--server", "http://x", "vm", "show", "--j") == ["--json"]
    assert _bash(tmp_path, "novacron", "migrate", "web", "--pol") == ["--policy"]
    assert _bash(tmp_path, "novacron", "vm", "create", "x", "--accel", "") == ["auto", "kvm", "tcg"]
    assert _bash(tmp_path, "novacron", "completion", "") == ["bash", "zsh"]
    # a flag's value is not taken for a subcommand: 'vm' after --to is a host name here
    assert "--policy" in _bash(tmp_path, "novacron", "migrate", "--to", "vm", "--")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is in tools/system-packages.txt")
def test_zsh_completes_subcommands_and_flags(tmp_path: Path) -> None:
    comp = _write(tmp_path, "zsh")

    def complete(*words: str) -> list[str]:
        # compadd only works inside a completion widget: stand in for it, keep the real
        # script and its function; CURRENT and words are what zsh sets for a widget.
        quoted = " ".join(f"'{w}'" for w in words)
        res = subprocess.run(
            ["zsh", "-f", "-c",
             f"autoload -U compinit && compinit -u -d {tmp_path}/zcompdump && source {comp} && "
             f"[[ $_comps[novacron] == _novacron ]] && "
             f"compadd() {{ shift; print -l -- \"$@\" }} && "
             f"words=({quoted}) && CURRENT={len(words)} && _novacron"],
            capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr
        return [w for w in res.stdout.splitlines() if w.startswith(words[-1])]

    assert complete("novacron", "vm", "cr") == ["create"]
    assert complete("novacron", "mig") == ["migrations", "migrate", "migration"]
    assert complete("novacron", "migrate", "web", "--to", "beta", "--pol") == ["--policy"]
    assert complete("novacron", "host", "maintenance", "h1", "o") == ["on", "off"]
