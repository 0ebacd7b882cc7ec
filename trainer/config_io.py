"""Typed config loading: YAML -> dataclasses, `--set a.b=c` overrides, one-line errors.

Each component owns its dataclass; this module only knows how to fill any dataclass from a
mapping, checking every key and type and naming the key in every error.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the file and/or key."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        arms = [a for a in args if a is not type(None)]
        errors = []
        for arm in arms:
            try:
                return _coerce(arm, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_type_name(value)} {value!r}")
        return [_coerce(args[0], item, f"{key}.{i}") for i, item in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_type_name(value)} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {_type_name(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got str {value!r}") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_type_name(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got str {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {_type_name(value)} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_type_name(value)} {value!r}")
        return value
    raise TypeError(f"config type {tp!r} of {key} is not supported")


def _suggest(key: str, known: list[str]) -> str:
    """'did you mean max_steps?' for a near miss (difflib's ratio >= 0.6), else the known keys."""
    close = difflib.get_close_matches(key, known, n=1)
    return f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"


def nearest_global_batches(global_batch_seqs: int, seq_len: int, world_size: int) -> list[int]:
    """The global batch sizes in tokens nearest to `global_batch_seqs` sequences (one below,
    one above) whose sequences split evenly over `world_size` ranks."""
    below = global_batch_seqs // world_size * world_size
    return [seqs * seq_len for seqs in (below, below + world_size) if seqs > 0]


def split_global_batch(
    global_batch_seqs: int,
    seq_len: int,
    world_size: int,
    micro_batch_size: int | None,
    max_micro_batch_size: int,
) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) that make up the global batch on `world_size`
    ranks; a batch that does not split names the nearest ones that do."""
    if global_batch_seqs % world_size:
        options = " or ".join(
            f"{tokens:,} ({tokens // seq_len} x {seq_len})"
            for tokens in nearest_global_batches(global_batch_seqs, seq_len, world_size)
        )
        raise ConfigError(
            f"train.global_batch_tokens: {global_batch_seqs} sequences per step do not split over "
            f"{world_size} ranks; the nearest that do: {options}"
        )
    per_rank = global_batch_seqs // world_size
    # The largest micro-batch <= the cap that divides this rank's share.
    micro = micro_batch_size or max(
        size for size in range(1, min(max_micro_batch_size, per_rank) + 1) if per_rank % size == 0
    )
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size: {micro} does not divide the {per_rank} sequences per rank"
        )
    return micro, per_rank // micro


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from `data`, checking keys and types; errors name the key."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_type_name(data)}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key ({_suggest(str(key), known)})")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for key in required:
        if key not in data:
            raise ConfigError(f"{prefix}{key}: required key is missing")
    kwargs = {key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as exc:  # a component's own validation: "key: problem"
        raise ConfigError(f"{prefix}{exc}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain nested dicts/lists (ready for YAML)."""
    result = dataclasses.asdict(obj)
    assert isinstance(result, dict)
    return result


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_type_name(data)}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to nested `data` in place."""
    key, sep, raw_value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    parts = key.strip().split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{here}: no list item {part} (the list has {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"{here}: is a {_type_name(node)}, cannot set {key}")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: no list item {last} (the list has {len(node)})")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{key}: cannot set a key inside a {_type_name(node)}")
