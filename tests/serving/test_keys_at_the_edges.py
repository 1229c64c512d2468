"""API keys at the edges: ambiguous credentials are refused, and no error ever prints a key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")  # the app's side (not on the GPU machine, where only the gpu tests run)
pytest.importorskip("ray")
from starlette.requests import Request  # noqa: E402

from deltafleet.serving.app import Ingress, Unauthorized  # noqa: E402
from deltafleet.serving.config import ConfigError, key_digest, parse_tenants  # noqa: E402

KEY = "sk-team-a-0123456789abcdef0123456789abcdef"


def _request(*authorization: str) -> Request:
    return Request({"type": "http", "headers": [(b"authorization", v.encode()) for v in authorization]})


def _ingress() -> SimpleNamespace:
    return SimpleNamespace(args=SimpleNamespace(auth="keys"), key_tenants={key_digest(KEY): frozenset({"team-a/bot"})},
                           status_key_sha256=key_digest(KEY))


def test_one_bearer_key_selects_its_tenants():
    assert Ingress.func_or_class._caller(_ingress(), _request(f"Bearer {KEY}")) == {"team-a/bot"}


def test_two_authorization_headers_are_refused_even_when_one_key_is_valid():
    for headers in ((f"Bearer {KEY}", "Bearer other"), ("Bearer other", f"Bearer {KEY}"), (f"Bearer {KEY}",) * 2):
        with pytest.raises(Unauthorized, match="2 Authorization headers") as e:
            Ingress.func_or_class._caller(_ingress(), _request(*headers))
        assert e.value.status == 401 and KEY not in str(e.value)
    assert not Ingress.func_or_class._may_read_states(_ingress(), _request(f"Bearer {KEY}", "Bearer x"))


@pytest.mark.parametrize("config", [
    {"tenants": {"team-a/bot": {"uri": "/store/a.safetensors", "key_sha256": [KEY]}}},
    {"tenants": {}, "status_key_sha256": KEY},
])
def test_a_raw_key_pasted_where_a_digest_belongs_is_refused_without_printing_it(config):
    with pytest.raises(ConfigError) as e:
        parse_tenants(config)
    message = str(e.value)
    assert "sha256" in message and KEY not in message and KEY[:12] not in message, message


def test_overload_and_not_ready_answers_say_when_to_retry():
    from deltafleet.serving.app import _error
    from deltafleet.serving.engine import BadRequest, EngineStopped, Overloaded, TenantUnavailable

    for e in (Overloaded("queue is full"), TenantUnavailable("loading"), EngineStopped("stopped")):
        response = _error(e)
        assert response.headers["retry-after"] == "1" and response.status_code in (429, 503)
    assert "retry-after" not in _error(BadRequest("no")).headers
