"""Typed parsing of a model config's string `parameters` into a frozen config dataclass.

Triton hands every `parameters` value over as a string. Both config classes (engine and
orchestrator) declare their keys as dataclass fields with `from __future__ import
annotations`, so a field's type is its annotation text ("int", "float", "bool", "str");
this module converts by that text, once, at model load, and every error names its key.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def typed_values(cls: Any, params: Mapping[str, str], what: str) -> dict[str, Any]:
    """The values of `params` that name a field of `cls`, converted to the field's type.

    Unknown keys are skipped (other backends' keys may share the block); `what` names the
    model kind in errors ("engine parameter 'x' must be a float, got 'abc'").
    """
    known = {f.name: f.type for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in params.items():
        kind = known.get(key)
        if kind is None:
            continue
        text = str(raw).strip()
        try:
            if kind == "bool":
                if text.lower() not in _TRUE | _FALSE:
                    raise ValueError
                values[key] = text.lower() in _TRUE
            elif kind == "int":
                values[key] = int(text)
            elif kind == "float":
                values[key] = float(text)
            else:
                values[key] = text
        except ValueError:
            raise ValueError(f"{what} parameter '{key}' must be a {kind}, got {raw!r}") from None
    return values
