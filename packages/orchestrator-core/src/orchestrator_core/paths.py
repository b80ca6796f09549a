"""Route path templates: ``/orders/{order_id}/items/{item}``.

A ``{name}`` segment matches one non-empty path segment and binds it as a path
param; every other segment matches literally. A template compiles once.
"""

from __future__ import annotations

import functools
import re

from picloud_shared.errors import InvalidInput

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@functools.lru_cache(maxsize=4096)
def compile_template(template: str) -> re.Pattern[str]:
    """The regex of a template; raises ``InvalidInput`` on a malformed template."""
    if not template.startswith("/"):
        raise InvalidInput("route paths start with '/'")
    pattern = ["^"]
    seen: set[str] = set()
    for i, segment in enumerate(template.split("/")):
        if i:
            pattern.append("/")
        m = _PARAM.fullmatch(segment)
        if m:
            name = m.group(1)
            if name in seen:
                raise InvalidInput(f"path param {name!r} appears twice")
            seen.add(name)
            pattern.append(f"(?P<{name}>[^/]+)")
        elif "{" in segment or "}" in segment:
            raise InvalidInput(f"bad path segment {segment!r}: use {{name}} for a whole segment")
        else:
            pattern.append(re.escape(segment))
    pattern.append("$")
    return re.compile("".join(pattern))


def match_template(template: str, path: str) -> dict[str, str] | None:
    """The path params if ``path`` matches ``template``, else ``None``."""
    m = compile_template(template).match(path)
    return None if m is None else m.groupdict()
