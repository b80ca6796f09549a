"""Matching requests against route path templates (their grammar:
:mod:`picloud_shared.route_paths`).

A ``{name}`` segment matches one non-empty path segment and binds it as a path
param; every other segment matches literally. A template is parsed once. Of the
templates a request matches, the most specific is served (:func:`specificity`).

A request is matched segment by segment, each segment decoded on its own
(:func:`request_segments`): an escaped ``%2F`` is part of a param's value (``a/b``),
never a separator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from picloud_shared.route_paths import parse_template


def match_template(template: str, path: str) -> dict[str, str] | None:
    """The path params if the decoded ``path`` matches ``template``, else ``None``."""
    return match_segments(template, path.split("/"))


def match_segments(template: str, segments: list[str]) -> dict[str, str] | None:
    """The path params if the decoded path ``segments`` (``"/a/b"`` is ``["", "a",
    "b"]``) match ``template``, else ``None``."""
    parts = parse_template(template)
    if len(parts) != len(segments):
        return None
    params: dict[str, str] = {}
    for (name, literal), segment in zip(parts, segments, strict=True):
        if name is None:
            if segment != literal:
                return None
        elif not segment:
            return None
        else:
            params[name] = segment
    return params


def specificity(template: str) -> tuple[bool, ...]:
    """Which of ``template``'s segments are params: of two templates that match the
    same request, the one whose tuple is smaller is the more specific (at the first
    segment where they differ, a literal beats a param; ``/u/me`` beats ``/u/{id}``,
    ``/a/b/{y}`` beats ``/a/{x}/c``)."""
    return tuple(name is not None for name, _ in parse_template(template))


def request_segments(scope: Mapping[str, Any], route_path: str) -> list[str]:
    """The decoded segments of a request's route path (``route_path``, the part after
    ``/apps/{app}``): from the undecoded ``raw_path`` when the server gives one that
    is this request's whole path, each segment decoded on its own; else split from
    ``route_path`` itself."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        text = raw.decode("latin-1")
        if unquote(text, errors="replace") == scope.get("path"):
            parts = text.split("/")[3:]  # past "", "apps" and the app's name
            return ["", *(unquote(p, errors="replace") for p in parts)] if parts else ["", ""]
    return route_path.split("/")
