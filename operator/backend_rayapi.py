"""`ray-api` backend: the Ray dashboard's Serve REST API (a Ray cluster not managed by KubeRay,
or local use). PUT /api/serve/applications/ replaces EVERY application of the cluster, so the
config sent is always the whole one built from all pools."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from deltafleet.operator.backend import AppStatus, BackendError
from deltafleet.operator.serveconfig import tenants_of_application

PATH = "/api/serve/applications/"


class RayApiBackend:
    name = "ray-api"

    def __init__(self, dashboard_url: str, timeout: float = 30.0, token_file: str = ""):
        self.url = dashboard_url.rstrip("/") + PATH
        self.timeout = timeout
        self.token_file = token_file
        # The dashboard keeps no hash; remember what this process applied (a restart re-PUTs
        # once, which Ray treats as a no-op when nothing changed).
        self._applied: str | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token_file:  # read each time: a rotated Secret takes effect without a restart
            try:
                token = open(self.token_file, encoding="utf-8").read().strip()
            except OSError as e:
                raise BackendError(f"Ray auth token file {self.token_file}: {e.strerror}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _request(self, method: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read().decode() or "{}"
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace").strip().splitlines()
            hint = ""
            if e.code in (401, 403) and self.token_file:
                hint = f" (the token in {self.token_file} was refused)"
            elif e.code in (401, 403):
                hint = (" (the cluster uses Ray token authentication: give the operator its token with "
                        "--ray-auth-token-file, or the chart's serve.rayApi.authTokenSecret)")
            raise BackendError(f"{method} {self.url}: HTTP {e.code}: {detail[-1] if detail else e.reason}{hint}") from None
        except (urllib.error.URLError, OSError) as e:
            raise BackendError(f"{method} {self.url}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise BackendError(f"{method} {self.url}: not JSON: {text[:200]!r}") from None

    def applied_hash(self) -> str | None:
        return self._applied

    def recheck(self) -> str | None:
        return self._applied

    def apply(self, config: dict, digest: str) -> None:
        self._request("PUT", config)
        self._applied = digest

    def statuses(self) -> dict[str, AppStatus]:
        body = self._request("GET")
        out: dict[str, AppStatus] = {}
        for name, app in (body.get("applications") or {}).items():
            deployed = app.get("deployed_app_config") or {}
            out[name] = AppStatus(
                status=app.get("status", "UNKNOWN"),
                message=app.get("message") or "",
                tenants=frozenset(tenants_of_application(deployed)),
            )
        return out
