"""Reading a deployment file's nested mappings with errors that name the key path.

A JSON-schema-like walk written out in code: each section is read through a `Section`,
whose getters check type and range and say what to write instead, and whose `done()`
rejects keys that the section does not know, listing the ones it does. Paths read like
`pools.context.tensor_parallel`, so a user can find the line to fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class DeploymentError(ValueError):
    """A deployment file is invalid; the message starts with the key path at fault."""


def fail(path: str, message: str) -> DeploymentError:
    return DeploymentError(f"{path}: {message}" if path else message)


@dataclass
class Section:
    """One mapping of the file and the path that leads to it; records the keys read."""

    data: Mapping[str, Any]
    path: str = ""
    seen: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, raw: Any, path: str) -> "Section":
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise fail(path, f"must be a mapping of keys to values, got {type(raw).__name__} {raw!r}")
        for key in raw:
            if not isinstance(key, str):
                raise fail(path, f"keys must be strings, got {key!r}")
        return cls(raw, path)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default: Any = None) -> Any:
        self.seen.add(name)
        return self.data.get(name, default)

    def section(self, name: str) -> "Section":
        return Section.of(self.raw(name), self.key(name))

    def string(self, name: str, default: str, choices: Sequence[str] = ()) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise fail(self.key(name), f"must be a string, got {value!r}")
        if choices and value not in choices:
            raise fail(self.key(name), f"must be one of {list(choices)}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise fail(self.key(name), f"must be true or false, got {value!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(self.key(name), f"must be a whole number, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise fail(self.key(name), f"must be {bound}, got {value}")
        return value

    def number(self, name: str, default: float, minimum: float = 0.0, maximum: float | None = None) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(self.key(name), f"must be a number, got {value!r}")
        if not value >= minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise fail(self.key(name), f"must be {bound}, got {value}")
        return float(value)

    def id_groups(self, name: str, groups: int, size: int, what: str) -> tuple[tuple[int, ...], ...]:
        """A list with one list of ids per engine, each `size` long (its ranks)."""
        value = self.raw(name)
        key = self.key(name)
        example = "[[0, 1], [2, 3]]" if size > 1 else "[[0], [1]]"
        if not isinstance(value, list) or not all(isinstance(g, list) for g in value):
            raise fail(key, f"must list the {what} of each engine, one list per engine, e.g. {example}; got {value!r}")
        if len(value) != groups:
            raise fail(key, f"lists {len(value)} engine(s) but the pool has engines: {groups}")
        out = []
        for i, group in enumerate(value):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in group):
                raise fail(f"{key}[{i}]", f"must be whole numbers >= 0, got {group!r}")
            if len(group) != size:
                raise fail(
                    f"{key}[{i}]",
                    f"engine {i} lists {len(group)} {what} but its world size (tensor_parallel x pipeline_parallel) "
                    f"is {size}: give one per rank",
                )
            if len(set(group)) != len(group):
                raise fail(f"{key}[{i}]", f"lists an id twice: {group}")
            out.append(tuple(group))
        return tuple(out)

    def scalars(self, name: str) -> dict[str, str]:
        """A flat mapping of knob -> scalar, rendered as config.pbtxt string values."""
        sub = self.section(name)
        out: dict[str, str] = {}
        for key, value in sub.data.items():
            if isinstance(value, bool):
                out[key] = "true" if value else "false"
            elif isinstance(value, (int, float, str)):
                out[key] = str(value)
            else:
                raise fail(sub.key(key), f"must be a single value (string, number or boolean), got {value!r}")
        return out

    def done(self) -> None:
        """Every key of this section was read: anything else is a typo or a misplaced key."""
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen)) or "none"
            raise fail(self.key(unknown[0]), f"unknown key; this section takes: {known}")
