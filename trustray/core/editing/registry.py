"""The editor registry: editor modules register themselves here; `trustray.core.editing.factory` imports them."""

from __future__ import annotations

from trustray.core.editing.base import Editor

EDITORS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    """Class decorator: adding an editor is one file and this one line (plus its import in the factory)."""
    if cls.name in EDITORS:
        raise ValueError(f"editor {cls.name!r} is registered twice")
    EDITORS[cls.name] = cls
    return cls
