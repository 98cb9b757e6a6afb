"""One validated config model per job: YAML file, then command-line flags on top, then pydantic.

Every flag's default comes from the pydantic model, so `--help`, the YAML example and the code
cannot disagree. Flags are parsed with `argparse.SUPPRESS` so that only the flags a user typed
override the YAML file.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class JobConfig(BaseModel):
    """Base for job configs: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argument parser whose help keeps our line breaks and has a `--config FILE` flag."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file with any of the options below; flags given here override it "
        "(default: none)",
    )
    return parser


def add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    model: type[BaseModel],
    help: str,
    field: str | None = None,
    **kwargs: Any,
) -> None:
    """Add `flag` for `model.field`, its help ending with `(default: X)` read from the model
    (`(default: required)` for a field without default, which YAML may also provide)."""
    name = field or flag.lstrip("-").replace("-", "_")
    info = model.model_fields[name]
    default = info.default
    shown = "required" if info.is_required() else "none" if default is None else default
    if isinstance(default, bool) and kwargs.get("action") == "store_true":
        shown = "off" if not default else "on"
    if isinstance(default, list):
        shown = " ".join(map(str, default)) or "none"
    parser.add_argument(flag, dest=name, help=f"{help} (default: {shown})", **kwargs)


def load_config(model: type[ConfigT], args: argparse.Namespace) -> ConfigT:
    """Merge the YAML file named by `args.config` with the flags in `args`, then validate.

    Raises:
        ConfigError: the YAML file is unreadable or not a mapping, or a value is invalid;
            the message names the option (as its flag) and what is wrong.
    """
    values: dict[str, Any] = {}
    config_path = getattr(args, "config", None)
    if config_path:
        try:
            loaded = yaml.safe_load(Path(config_path).read_text())
        except OSError as err:
            raise ConfigError(f"--config {config_path}: cannot read: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {config_path}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_path}: expected a mapping of option: value")
        values.update({str(key).replace("-", "_"): value for key, value in loaded.items()})
    values.update({key: value for key, value in vars(args).items() if key != "config"})
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_describe(err, config_path)) from None


def _describe(err: ValidationError, config_path: str | None) -> str:
    problems = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        flag = "--" + field.replace("_", "-")
        given = item.get("input")
        if not item["loc"]:  # a check across options: its message names them
            problems.append(item["msg"].removeprefix("Value error, "))
        elif item["type"] == "extra_forbidden":
            where = f" in {config_path}" if config_path else ""
            problems.append(f"unknown option '{field}'{where}")
        elif item["type"] == "missing":
            problems.append(f"{flag} is required")
        else:
            problems.append(f"{flag} {given!r}: {item['msg']}")
    return "; ".join(problems)


def parse_size(text: str | int) -> int:
    """Bytes in a size like `4GB`, `512MiB`, `1.5G` or `1000000` (KB, MB, GB are powers of 10).

    Raises:
        ValueError: not a number with an optional unit.

    Example:
        >>> parse_size("1.5GB"), parse_size("1KiB"), parse_size(300)
        (1500000000, 1024, 300)
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text).lower())
    if not match:
        raise ValueError(f"{text!r} is not a size like 4GB, 512MiB or 1000000")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " kmgt".index(unit or " "))
