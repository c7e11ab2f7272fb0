"""Every program's argparse tree: each subcommand and flag says what it does (and its default)."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from novacron import __version__, config
from novacron.agent.main import DAEMON as AGENT
from novacron.cli.bench import available, bench_parser
from novacron.cli.main import build_parser
from novacron.coordinator.main import DAEMON as COORDINATOR

PARSERS = {"novacron": build_parser, "novacron-agent": AGENT.parser,
           "novacron-coordinator": COORDINATOR.parser,
           # each benchmark parses its own options after 'novacron bench NAME'
           **{f"novacron bench {name}": lambda name=name: bench_parser(name) for name in available()}}


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


def problems(prog: str) -> Iterator[str]:
    for path, parser in walk(PARSERS[prog](), prog):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.metavar or action.dest
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if not choice.help:
                        yield f"{path} {choice.dest}: subcommand without help"
                continue
            if action.help == argparse.SUPPRESS:
                continue  # hidden on purpose (e.g. the arguments passed on to a benchmark)
            if not action.help:
                yield f"{path} {name}: no help text"
                continue
            default = action.default
            if (action.option_strings and default not in (None, False, [], argparse.SUPPRESS)
                    and not isinstance(action, argparse._VersionAction)
                    and "default" not in action.help):
                yield f"{path} {name}: default {default!r} not in its help"
            if action.metavar and str(action.metavar).upper().startswith("CFG__"):
                yield f"{path} {name}: internal metavar {action.metavar}"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_flag_and_subcommand_has_help(prog: str) -> None:
    found = list(problems(prog))
    assert not found, "\n".join(found)


def test_walk_sees_nested_subcommands() -> None:
    """The walk reaches second-level commands, so the test above checks them too."""
    paths = {path for path, _ in walk(build_parser(), "novacron")}
    assert {"novacron vm create", "novacron migration show", "novacron host maintenance"} <= paths


def test_a_flag_without_help_is_found() -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers().add_parser("y", help="why")
    sub.add_argument("--quiet-one")
    sub.add_argument("--count", type=int, default=3, help="how many")
    PARSERS["x"] = lambda: parser
    try:
        assert list(problems("x")) == ["x y --quiet-one: no help text",
                                       "x y --count: default 3 not in its help"]
    finally:
        del PARSERS["x"]


@pytest.mark.parametrize("settings", [AGENT.settings, COORDINATOR.settings])
def test_every_setting_has_a_description(settings: type) -> None:
    """A settings field without ``setting(help=...)`` would show only its default in --help."""
    missing = [".".join(path) for path, (text, _default) in config.describe(settings).items()
               if not text.strip()]
    assert not missing, f"settings without a description: {missing}"


@dataclass
class Inner:
    quiet: int = 1


@dataclass
class Outer:
    port: int = config.setting(7, help="TCP port")
    inner: Inner = field(default_factory=Inner)


def test_a_setting_without_description_is_found() -> None:
    assert config.describe(Outer) == {("port",): ("TCP port", 7), ("inner", "quiet"): ("", 1)}


def test_settings_flags_show_description_unit_and_default() -> None:
    text = COORDINATOR.parser().format_help()
    assert "--heartbeat-timeout-s SECONDS" in text
    assert "marked down (default: 20.0)" in " ".join(text.split())
    assert "--http-max-connections N" in text
    agent = " ".join(AGENT.parser().format_help().split())
    assert "--accel {auto,kvm,tcg}" in agent and "(default: auto)" in agent
    assert "CFG__" not in build_parser().format_help()


@pytest.mark.parametrize("prog", ["novacron", "novacron-agent", "novacron-coordinator"])
def test_version(prog: str, script_env: dict[str, str]) -> None:
    res = subprocess.run([prog, "--version"], env=script_env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{prog} {__version__}"
