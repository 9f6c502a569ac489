"""Settings files: the one YAML loader (serve, train and bench configs), refusing unknown keys, since a
typo must not pass silently; and the mapping -> settings dataclass builder the bench configs share."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, TypeVar

import yaml

from genarm_common.errors import SetupError

T = TypeVar("T")


def load_settings(
    path: str | Path, known: Collection[str], error: type[Exception] = SetupError, dashes: bool = False
) -> dict[str, Any]:
    """The mapping a YAML file holds, every key one of `known`; problems raise `error` in one line.

    `dashes=True` reads `learning-rate` as `learning_rate` (keys spelled like command-line flags).
    """
    file = Path(path)
    if not file.is_file():
        raise error(f"config file {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise error(f"config file {file} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise error(f"config file {file} must hold a mapping of settings")
    if dashes:
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise error(f"config file {file}: unknown setting(s) {unknown}; known: {sorted(known)}")
    return data


def load_dataclass(cls: type[T], path: str | Path, error: type[Exception] = ValueError) -> T:
    """A settings dataclass from a YAML file of its fields (nested ones as mappings)."""
    return settings_dataclass(cls, load_settings(path, [f.name for f in dataclasses.fields(cls)], error), error)


def settings_dataclass(cls: type[T], data: dict[str, Any], error: type[Exception] = ValueError) -> T:
    """`cls(**data)`, with nested settings dataclasses (also in lists, or optional) built from their
    mappings; a key that names no field raises `error`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise error(f"unknown setting(s) {unknown}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: _build(hints[key], value, error) for key, value in data.items()})


def _build(hint: Any, value: Any, error: type[Exception]) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return settings_dataclass(hint, value, error)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and args and isinstance(value, list):
        return [_build(args[0], item, error) for item in value]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        nested = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
        if nested and isinstance(value, dict):
            return settings_dataclass(nested[0], value, error)
    return value


class SettingsFile:
    """Mixin for a settings dataclass kept in a YAML file: `load(path)` and `to_dict()`."""

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return load_dataclass(cls, path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]
