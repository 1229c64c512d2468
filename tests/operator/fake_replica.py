"""A real HTTP server on loopback that answers a pool's tenant-status route
(`GET /<pool>/-/tenants`) the way DeltaServer replicas do, for tests where no Ray Serve runs
(KubeRay is played by the test) or where an answer must be chosen exactly."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NOT_FOUND = {"error": {"message": "Not Found", "type": "not_found_error", "param": None, "code": 404}}


class FakeReplicas:
    """`answer(pool, bearer_key)` -> (HTTP status, JSON body or raw text) for each GET of
    /<pool>/-/tenants; every other path is a 404. `seen` records (path, Authorization header)."""

    def __init__(self, answer: Callable[[str, str | None], tuple[int, dict | str]], port: int = 0):
        self.answer, self.seen = answer, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization")
                fake.seen.append((self.path, auth))
                pool, sep, rest = self.path.lstrip("/").partition("/")
                key = auth.partition(" ")[2] if auth and auth.lower().startswith("bearer ") else None
                code, body = fake.answer(pool, key) if sep and rest == "-/tenants" else (404, NOT_FOUND)
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def keyed(states: Callable[[str], dict | None], digests: Callable[[str], str | None]):
    """An `answer` that behaves as replicas with `auth: keys`: only a bearer whose sha256 is the
    pool's status_key_sha256 reads the states ({tenant: {"state", "error"}}); anyone else, and
    any pool it does not serve, gets the unknown route's 404."""
    def answer(pool: str, key: str | None):
        tenants, want = states(pool), digests(pool)
        if tenants is None or not want or key is None or hashlib.sha256(key.encode()).hexdigest() != want:
            return 404, NOT_FOUND
        return 200, {"replica": f"fake-{pool}", "tenants": tenants}
    return answer
