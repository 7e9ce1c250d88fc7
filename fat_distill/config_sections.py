"""Config sections that apply a partial YAML section on top of that section's own defaults.

Pydantic builds a field from its ``default_factory`` only when the key is absent;
a partial mapping (``teacher: {train: {seed: 0}}``) is validated on its own and
falls back to the *class* defaults of the nested model. Where the factory differs
from the class (the teacher's ``TrainConfig(epochs=5)``), that silently drops the
section's defaults. :class:`Section` merges the partial mapping into the factory's
value first, recursively, so every defaulted section keeps its defaults.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def merge_onto(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` applied on top of ``defaults``; mappings merge key by key, everything else is replaced."""
    merged = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_onto(merged[key], value)
        else:
            merged[key] = value
    return merged


class Section(BaseModel):
    """A typed config section: unknown keys are errors, partial sub-sections keep their defaults."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _partial_sections_keep_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            given = data.get(name)
            if not isinstance(given, dict) or field.default_factory is None:
                continue
            default = field.default_factory()
            if isinstance(default, BaseModel):
                # exclude_unset=False: the factory's own settings (epochs=5) and the class defaults alike.
                data[name] = merge_onto(default.model_dump(mode="python"), given)
        return data
