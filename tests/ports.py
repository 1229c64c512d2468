"""A free TCP port on loopback for a server a test starts. tests/ is on sys.path (the folder of
the root conftest.py), so every test folder imports it as `from ports import free_port`."""

import socket


def free_port() -> int:
    """A port nothing listens on now; the OS picks it, the caller's server binds it next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
