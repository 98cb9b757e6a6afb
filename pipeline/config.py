"""One validated config model per job, and the command line generated from it.

Each option is declared once, as a field of the job's pydantic model with its help text
(`option(...)`). `parse_config` builds the argparse interface from the model, reads the YAML
file named by `--config`, lays the flags the user typed on top and validates the result. So
`--help`, the YAML keys, the defaults and the checks cannot disagree.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ByteSize, ConfigDict, Field, ValidationError

from pipeline.errors import ConfigError

ConfigT = TypeVar("ConfigT", bound=BaseModel)

# Devices are named as torch names them; `gpu` is accepted as an alias of `cuda`.
DEVICE_ALIASES = {"gpu": "cuda"}
Device = Annotated[
    Literal["auto", "cpu", "cuda"],
    BeforeValidator(lambda value: DEVICE_ALIASES.get(value, value)),
]

# A size as a user writes it (`4GB`, `512MiB`, `1.5G`, `1000000`), validated into bytes.
Size = Annotated[ByteSize, Field(gt=0)]


class JobConfig(BaseModel):
    """Base for job configs: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def option(
    default: Any = ...,
    help: str = "",
    *,
    flag: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    **constraints: Any,
) -> Any:
    """A config field that is also a command-line option.

    Args:
        default: the default (`...`: required, from the command line or YAML).
        help: one line for `--help`; `(default: X)` is appended from `default`.
        flag: the flag when it is not `--field-name` (e.g. `-k`, `--json`).
        metavar: the value's name in `--help` (default: the field's name in capitals).
        positional: an argument without a flag (still optional on the command line, so that
            the YAML file may give it).
        constraints: pydantic `Field` constraints such as `ge=1`.

    Example:
        >>> class Example(JobConfig):
        ...     k: int = option(10, "results per query", flag="-k", ge=1)
    """
    cli = {"flag": flag, "metavar": metavar, "positional": positional}
    return Field(default, description=help, json_schema_extra={"cli": cli}, **constraints)


def parse_config(
    model: type[ConfigT],
    argv: list[str] | None,
    prog: str,
    description: str,
    epilog: str | None = None,
) -> ConfigT:
    """Parse `argv` (YAML from `--config`, flags on top) into a validated `model`.

    Raises:
        ConfigError: unreadable YAML or an invalid value; the message names the flag.
    """
    return load_config(model, new_parser(model, prog, description, epilog).parse_args(argv))


def new_parser(
    model: type[BaseModel], prog: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The argparse interface of `model`: `--config FILE`, then one argument per field.

    Flags are parsed with `argparse.SUPPRESS` so that only the flags a user typed override the
    YAML file; the values are validated by the model, not by argparse.
    """
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
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        cli = extra.get("cli") if isinstance(extra, dict) else None
        if cli is None:
            continue
        _add_argument(parser, name, info, cli)
    return parser


def _add_argument(parser: argparse.ArgumentParser, name: str, info: Any, cli: dict) -> None:
    if cli["positional"]:
        parser.add_argument(name, nargs="?", metavar=cli["metavar"] or name.upper(),
                            help=info.description)
        return
    choices = _choices(info.annotation)
    metavar = cli["metavar"] or ("{" + ",".join(choices) + "}" if choices else name.upper())
    kwargs: dict[str, Any] = {"help": f"{info.description} (default: {_shown_default(info)})"}
    if _is_list(info.annotation):
        kwargs.update(nargs="+", metavar=metavar)
    elif _is_bool(info.annotation):
        # an option that is on by default is turned off with --no-NAME
        kwargs.update(action=argparse.BooleanOptionalAction if info.default else "store_true")
    else:
        kwargs.update(metavar=metavar)
    parser.add_argument(cli["flag"] or "--" + name.replace("_", "-"), dest=name, **kwargs)


def _shown_default(info: Any) -> str:
    if info.is_required():
        return "required"
    default = info.default
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default)) or "none"
    return str(default)


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of `X | None`, `Annotated[X, ...]` and `Optional[X]`, else (X,)."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(
            member
            for arg in typing.get_args(annotation)
            for member in _members(arg)
            if member is not type(None)
        )
    return (annotation,)


def _choices(annotation: Any) -> list[str]:
    return [
        str(value)
        for member in _members(annotation)
        if typing.get_origin(member) is Literal
        for value in typing.get_args(member)
    ]


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(member) in (list, tuple) for member in _members(annotation))


def _is_bool(annotation: Any) -> bool:
    return _members(annotation) == (bool,)


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
        raise ConfigError(_describe(err, model, config_path)) from None


def flag_of(model: type[BaseModel], field: str) -> str:
    """How a user writes `field` on the command line (`--batch-size`, `-k`, `SOURCE`)."""
    info = model.model_fields.get(field)
    extra = info.json_schema_extra if info is not None else None
    cli = extra.get("cli") if isinstance(extra, dict) else None
    if cli and cli["positional"]:
        return cli["metavar"] or field.upper()
    if cli and cli["flag"]:
        return cli["flag"]
    return "--" + field.replace("_", "-")


def _describe(err: ValidationError, model: type[BaseModel], config_path: str | None) -> str:
    problems = []
    for item in err.errors():
        field = str(item["loc"][0]) if item["loc"] else ""
        flag = flag_of(model, field)
        given = item.get("input")
        if not item["loc"]:  # a check across options: its message names them
            problems.append(item["msg"].removeprefix("Value error, "))
        elif item["type"] == "extra_forbidden":
            where = f" in {config_path}" if config_path else ""
            problems.append(f"unknown option '{field}'{where}")
        elif item["type"] == "missing":
            problems.append(f"{flag} is required")
        else:
            # as typed on the command line; quoted where the value is not a plain word
            shown = given if isinstance(given, str) and given.split() == [given] else repr(given)
            problems.append(f"{flag} {shown}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)
