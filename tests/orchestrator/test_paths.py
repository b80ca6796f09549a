"""Route path templates."""

from __future__ import annotations

import pytest

from orchestrator_core.paths import match_template, specificity
from picloud_shared.errors import InvalidInput
from picloud_shared.route_paths import check_route_path, parse_template, route_shape


def test_literal_path_matches_itself_only() -> None:
    """A template without params is a literal."""
    assert match_template("/hello", "/hello") == {}
    assert match_template("/hello", "/hello/") is None
    assert match_template("/a.b", "/axb") is None


def test_params_bind_one_segment_each() -> None:
    """{name} binds exactly one non-empty segment."""
    assert match_template("/orders/{id}/items/{item}", "/orders/7/items/x") == {
        "id": "7",
        "item": "x",
    }
    assert match_template("/orders/{id}", "/orders/") is None
    assert match_template("/orders/{id}", "/orders/1/2") is None


@pytest.mark.parametrize("bad", ["nope", "/a/{x}/{x}", "/a/b{x}", "/a/{x"])
def test_malformed_templates_are_invalid(bad: str) -> None:
    """Templates that cannot be matched unambiguously are refused."""
    with pytest.raises(InvalidInput):
        parse_template(bad)


@pytest.mark.parametrize("bad", ["/a b", "/a?x", "/a#x", "/a\x00", "/" + "a" * 1024])
def test_the_orchestrator_refuses_what_the_admin_api_refuses(bad: str) -> None:
    """One grammar: a template the admin API would refuse is not matched either."""
    with pytest.raises(InvalidInput):
        parse_template(bad)


def test_templates_differing_only_in_param_names_have_one_shape() -> None:
    """``/u/{id}`` and ``/u/{name}`` match the same requests."""
    assert route_shape("/u/{id}/x") == route_shape("/u/{name}/x") == "/u/{}/x"
    assert route_shape("/u/{id}") != route_shape("/u/id")


@pytest.mark.parametrize("unreachable", ["/a/./b", "/a/..", "/./x", "/pct%20x", "/a/%7Bid%7D"])
def test_a_new_route_may_not_have_a_path_no_request_reaches(unreachable: str) -> None:
    """Clients resolve ``.``/``..`` segments before sending, and segments are matched
    decoded: such routes could never be called, so creating one is refused."""
    with pytest.raises(InvalidInput):
        check_route_path(unreachable)
    assert check_route_path("/a.b/..c/{x}") == "/a.b/..c/{x}"


def test_specificity_ranks_a_literal_before_a_param_at_the_first_difference() -> None:
    """Of two templates matching one request, the smaller tuple is the more specific,
    whatever their text's order (``é`` and ``~`` sort after ``{``)."""
    assert specificity("/u/é") < specificity("/u/{id}")
    assert specificity("/u/~x") < specificity("/u/{id}")
    assert specificity("/a/é/{y}") < specificity("/a/{x}/z") < specificity("/a/{x}/{y}")
    assert specificity("/u/{id}") == specificity("/u/{name}")
