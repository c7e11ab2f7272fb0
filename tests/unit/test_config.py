"""Layered config: defaults <- TOML <- environment <- flags, and clear errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from novacron import config


@dataclass
class Limits:
    bandwidth: int = 0
    ratio: float = 1.5


@dataclass
class Sample:
    port: int = 7700
    name: str = "a"
    debug: bool = False
    state_dir: Path = Path("/tmp/x")
    mode: Literal["kvm", "tcg", "auto"] = "auto"
    tags: list[str] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_flags(p, Sample)
    return p.parse_args(argv)


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "c.toml"
    f.write_text(text)
    return f


def test_defaults() -> None:
    cfg = config.load(Sample, env_prefix="T", environ={})
    assert cfg == Sample()


def test_file_env_flag_precedence(tmp_path: Path) -> None:
    f = write(tmp_path, 'port = 1\nname = "file"\n[limits]\nbandwidth = 5\n')
    cfg = config.load(
        Sample,
        path=f,
        env_prefix="T",
        environ={"T_PORT": "2", "T_LIMITS_RATIO": "2.5", "T_TAGS": "a, b"},
        args=parse(["--port", "3"]),
    )
    assert cfg.port == 3  # flag beats env beats file
    assert cfg.name == "file"
    assert cfg.limits.bandwidth == 5
    assert cfg.limits.ratio == 2.5
    assert cfg.tags == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("port = 'x'", "port", "expected an integer"),
        ("prot = 1", "prot", "unknown key"),
        ("mode = 'xen'", "mode", "expected one of"),
        ("limits = 3", "limits", "[section]"),
        ("[limits]\nratio = 'fast'", "limits.ratio", "expected a number"),
        ("debug = 1", "debug", "expected true or false"),
        ("port = ", "-", "invalid TOML"),
    ],
)
def test_bad_file_names_file_key_and_problem(tmp_path: Path, text: str, key: str, problem: str) -> None:
    f = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(Sample, path=f, env_prefix="T", environ={})
    assert err.value.key == key
    assert problem in err.value.problem
    assert str(f) in str(err.value)


def test_bad_env_and_flag_are_named() -> None:
    with pytest.raises(config.ConfigError, match="environment T_PORT"):
        config.load(Sample, env_prefix="T", environ={"T_PORT": "many"})
    with pytest.raises(config.ConfigError, match="flag --limits-bandwidth"):
        config.load(Sample, env_prefix="T", environ={}, args=parse(["--limits-bandwidth", "x"]))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="file not found"):
        config.load(Sample, path=tmp_path / "nope.toml", env_prefix="T", environ={})


def _check(cfg: Sample) -> None:
    if cfg.limits.bandwidth < 0:
        raise config.Invalid("limits.bandwidth", "must not be negative")


def test_check_names_the_layer_that_set_the_value(tmp_path: Path) -> None:
    f = write(tmp_path, "[limits]\nbandwidth = -1\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(Sample, path=f, env_prefix="T", environ={}, check=_check)
    assert str(err.value) == f"{f}: key 'limits.bandwidth': must not be negative"
    with pytest.raises(config.ConfigError, match=r"^environment T_LIMITS_BANDWIDTH: key 'limits.bandwidth'"):
        config.load(Sample, path=f, env_prefix="T", environ={"T_LIMITS_BANDWIDTH": "-2"}, check=_check)
    with pytest.raises(config.ConfigError, match=r"^flag --limits-bandwidth: key 'limits.bandwidth'"):
        config.load(Sample, path=f, env_prefix="T", environ={"T_LIMITS_BANDWIDTH": "5"},
                    args=parse(["--limits-bandwidth", "-3"]), check=_check)
    # a later layer that fixes the value wins; the check passes
    fixed = config.load(Sample, path=f, env_prefix="T", environ={"T_LIMITS_BANDWIDTH": "5"}, check=_check)
    assert fixed.limits.bandwidth == 5


def test_check_of_an_unset_value_names_the_settings() -> None:
    def need_name(cfg: Sample) -> None:
        if cfg.name == "a":
            raise config.Invalid("name", "required")

    with pytest.raises(config.ConfigError, match=r"^settings: key 'name': required$"):
        config.load(Sample, env_prefix="T", environ={}, check=need_name)
