"""Load a RunConfig from YAML with `a.b.c=value` overrides.

Precedence: dataclass defaults < YAML file (and the files it lists under `include:`) < command-line
overrides, in order. An override may reach into a list element: `distill.teachers.0.top_k=32` or
`distill.teachers[0].top_k=32` change that one field of the first teacher. OmegaConf does merging,
interpolation (`${student.model.vocab_size}`) and type conversion against the dataclass schema; every
failure becomes a ConfigError naming the dotted key, the bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from pathlib import Path
from typing import Any, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from mopd.config.checks import Problem
from mopd.config.run import REMOVED_KEYS, RunConfig
from mopd.errors import ConfigError


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The RunConfig from ``path`` (or defaults) with dotted overrides applied, validated."""
    layers: list[Any] = []
    if path is not None:
        layers.append(_read_yaml(Path(path)))
    layers.extend(_override_layers(RunConfig, layers, overrides))
    return build_config(RunConfig, *layers)


def build_config(schema: type, *layers: Any) -> Any:
    """Merge plain dicts / DictConfigs onto a dataclass schema and validate the result."""
    for layer in layers:
        _check_list_items(schema, OmegaConf.create(layer) if isinstance(layer, dict) else layer, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema) from None
    problems = list(_walk_problems(config, ""))
    if problems:
        lines = [f"{p.key}={p.value!r}: {p.reason}" for p in problems]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))
    return config


def with_overrides(config: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """A copy of a built config with dotted overrides applied and validated again."""
    if not overrides:
        return config
    base = [OmegaConf.structured(config)]
    return build_config(type(config), *base, *_override_layers(type(config), base, overrides))


def to_yaml(config: Any) -> str:
    """The config as YAML (what a run records next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    includes = node.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    bases = [_read_yaml(path.parent / inc) for inc in includes]
    return OmegaConf.merge(*bases, node) if bases else node


_LIST_INDEX = re.compile(r"\[(\d+)\]|\.(\d+)(?=\.|$)")


def _override_layers(schema: type, base: list[Any], overrides: list[str] | tuple[str, ...]) -> list[DictConfig]:
    """The overrides as merge layers, in order: runs of plain `a.b=c` items as one dotlist layer each, and an
    item that reaches into a list element as the whole list with that element changed (OmegaConf's dotlist
    would turn the index into a dict key)."""
    layers: list[DictConfig] = []
    plain: list[str] = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, _ = item.split("=", 1)
        if not _LIST_INDEX.search(key):
            plain.append(item)
            continue
        if plain:
            layers.append(_dotlist(plain))
            plain = []
        layers.append(_list_element_layer(schema, [*base, *layers], item))
    if plain:
        layers.append(_dotlist(plain))
    return layers


def _dotlist(items: list[str]) -> DictConfig:
    try:
        return OmegaConf.from_dotlist(items)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {items}: {exc}") from None


def _list_element_layer(schema: type, layers: list[Any], item: str) -> DictConfig:
    """`a.list[i].b=v` as `{a: {list: [...the current list with element i's b set to v...]}}`."""
    key, raw = item.split("=", 1)
    value = _dotlist([f"value={raw}"])["value"]
    value = OmegaConf.to_container(value, resolve=False) if isinstance(value, (DictConfig, ListConfig)) else value
    tokens: list[str | int] = []
    for part in _LIST_INDEX.sub(lambda m: f".[{m.group(1) or m.group(2)}]", key).split("."):
        tokens.append(int(part[1:-1]) if part.startswith("[") else part)
    first = next(i for i, t in enumerate(tokens) if isinstance(t, int))
    list_key = ".".join(str(t) for t in tokens[:first])
    try:
        current = OmegaConf.select(OmegaConf.merge(OmegaConf.structured(schema), *layers), list_key)
    except OmegaConfBaseException as exc:
        raise _explain(exc, schema) from None
    if not isinstance(current, ListConfig):
        raise ConfigError(f"override {item!r}: {list_key} is not a list")
    container = OmegaConf.to_container(current, resolve=False)
    node, shown = container, list_key
    for token in tokens[first:-1]:
        node, shown = _child(node, token, shown, item)
    last = tokens[-1]
    if isinstance(last, int):
        _child(node, last, shown, item)  # range check
    elif not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {shown} is not a mapping")
    node[last] = value
    layer: Any = container
    for token in reversed(tokens[:first]):
        layer = {token: layer}
    return OmegaConf.create(layer)


def _child(node: Any, token: str | int, shown: str, item: str) -> tuple[Any, str]:
    if isinstance(token, int):
        if not isinstance(node, list):
            raise ConfigError(f"override {item!r}: {shown} is not a list")
        if token >= len(node):
            raise ConfigError(f"override {item!r}: {shown}[{token}] does not exist ({shown} has {len(node)} "
                              f"element(s)); set the whole list with {shown}=[...]")
        return node[token], f"{shown}[{token}]"
    if not isinstance(node, dict):
        raise ConfigError(f"override {item!r}: {shown} is not a mapping")
    return node.setdefault(token, {}), f"{shown}.{token}"


def _check_list_items(schema: type, node: Any, path: str) -> None:
    """Merge each element of a list-of-dataclasses field on its own, so that an error inside
    ``teachers[1]`` names ``distill.teachers[1].<key>`` (OmegaConf reports list items without their path)."""
    if not isinstance(node, DictConfig):
        return
    hints = get_type_hints(schema)
    for key in node.keys():
        hint = hints.get(str(key))
        child = node._get_node(key)
        if hint is None or child is None or child._is_interpolation():
            continue  # unknown keys are reported by the main merge; interpolations resolve against the root
        sub = f"{path}.{key}" if path else str(key)
        if dataclasses.is_dataclass(hint):
            _check_list_items(hint, node[key], sub)
        elif getattr(hint, "__origin__", None) is list and dataclasses.is_dataclass(hint.__args__[0]):
            for i, item in enumerate(node[key] or []):
                item_path = f"{sub}[{i}]"
                _check_list_items(hint.__args__[0], item, item_path)  # innermost errors first
                plain = OmegaConf.to_container(item, resolve=False) if isinstance(item, DictConfig) else item
                try:  # merging checks keys and types; interpolations resolve later, against the root
                    merged = OmegaConf.merge(OmegaConf.structured(hint.__args__[0]), plain)
                except OmegaConfBaseException as exc:
                    raise _explain(exc, hint.__args__[0], prefix=item_path + ".") from None
                missing = [f.name for f in dataclasses.fields(hint.__args__[0]) if OmegaConf.is_missing(merged, f.name)]
                if missing:
                    raise ConfigError(f"{item_path}.{missing[0]}: required key is missing")


def _explain(exc: OmegaConfBaseException, schema: type, prefix: str = "") -> ConfigError:
    key = prefix + str(getattr(exc, "full_key", None) or getattr(exc, "key", None) or "<root>")
    message = str(exc).splitlines()[0]
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"{key}: required key is missing")
    if isinstance(exc, ConfigKeyError):
        if key in REMOVED_KEYS:
            return ConfigError(f"{key}: unknown key; {REMOVED_KEYS[key]}")
        owner = getattr(exc, "object_type", None)
        valid = sorted(f.name for f in dataclasses.fields(owner)) if dataclasses.is_dataclass(owner) else []
        return ConfigError(f"{key}: unknown key; valid keys here: {valid}")
    if isinstance(exc, ValidationError):
        expected = _expected_type(exc, key, schema)
        return ConfigError(f"{key}: {message}{expected}")
    return ConfigError(f"{key}: {message}")


def _expected_type(exc: OmegaConfBaseException, key: str, schema: type) -> str:
    owner = getattr(exc, "object_type", None)
    field_name = str(key).split(".")[-1].split("[")[0]
    if not dataclasses.is_dataclass(owner):
        return ""
    hint = get_type_hints(owner).get(field_name)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return ""  # OmegaConf's message already lists the valid choices
    return f" (expected {getattr(hint, '__name__', hint)})" if hint is not None else ""


def _walk_problems(node: Any, path: str):
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk_problems(item, f"{path}[{i}]")
        return
    if not dataclasses.is_dataclass(node):
        return
    prefix = f"{path}." if path else ""
    if hasattr(node, "problems"):
        for p in node.problems():
            yield Problem(prefix + p.key, _plain(p.value), p.reason)
    for f in dataclasses.fields(node):
        yield from _walk_problems(getattr(node, f.name), prefix + f.name)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value
