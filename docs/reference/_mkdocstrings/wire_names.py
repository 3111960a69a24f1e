"""A griffe extension for the API reference: record each pydantic field's wire name.

griffe-pydantic finds the models and their fields but not their aliases, which
chatfeed's models generate (camelCase) at class creation. This extension runs
after it, imports each model and stores ``FieldInfo.alias`` in the field's
``extra["chatfeed"]["wire_name"]``, which ``python/material/pydantic_model.html.jinja``
(beside this file) shows in each model's table of fields. It also takes each
field's default from pydantic, and what pydantic does not count as a field
loses griffe-pydantic's ``pydantic-field`` label.
"""

from __future__ import annotations

from typing import Any

import griffe
from pydantic import BaseModel


class WireNames(griffe.Extension):
    """Record the JSON name of every field of every pydantic model in the package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for cls in _classes(pkg):
            if "pydantic-model" not in cls.labels:
                continue
            model = griffe.dynamic_import(cls.path)
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                continue
            for name, member in cls.all_members.items():
                if not isinstance(member, griffe.Attribute) or "pydantic-field" not in member.labels:
                    continue
                info = model.model_fields.get(name)
                if info is None:
                    # Static analysis takes `_validator = model_validator(...)(function)` for a field.
                    member.labels.discard("pydantic-field")
                else:
                    member.extra["chatfeed"]["wire_name"] = info.alias or name
                    # Static analysis misses `= None` after `Annotated[..., Field(...)]`.
                    member.value = None if info.is_required() else repr(info.default)


def _classes(module: griffe.Module) -> list[griffe.Class]:
    found: list[griffe.Class] = []
    for member in module.members.values():
        if member.is_alias:
            continue
        if isinstance(member, griffe.Module):
            found.extend(_classes(member))
        elif isinstance(member, griffe.Class):
            found.append(member)
    return found
