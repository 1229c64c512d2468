"""Serve backends: how the operator applies a serve config and reads application status.

Both take the WHOLE multi-application config (every pool) built by serveconfig, and apply it
only when its hash differs from what the backend already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

RUNNING = "RUNNING"
DEPLOY_FAILED = "DEPLOY_FAILED"


class BackendError(RuntimeError):
    """The backend could not be reached or refused the config (temporary: retried)."""


@dataclass(frozen=True)
class TenantState:
    """One tenant of a pool, as its tenant-status route reports it."""

    state: str  # serving.config.TENANT_STATES: loading, ready (its delta loads), failed
    error: str = ""  # why it failed (the replica's own message)
    replicas: int = 0  # engine replicas holding it now (placement: routed loads it where it is asked for)


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica of a pool answered at its tenant-status route (operator/replica_status.py),
    or why it could not be read (tenants None, error set)."""

    tenants: dict[str, TenantState] | None
    error: str = ""
    replica: str = ""  # the ingress replica that answered (one of the pool's, chosen by Serve's router)
    replicas: int = 0  # the pool's live engine replicas


@dataclass(frozen=True)
class AppStatus:
    status: str  # Ray Serve's: RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, DELETING, NOT_STARTED
    message: str = ""
    # Tenants the deployed config holds, when the backend can tell (ray-api); None otherwise.
    tenants: frozenset[str] | None = None
    # A replica's tenant states, read through the serve endpoint once the application is RUNNING
    # (replica_status.attach_reports); None: not read.
    replica: ReplicaReport | None = None


class Backend(Protocol):
    name: str

    def applied_hash(self) -> str | None:
        """Hash of the config the backend holds now (None: unknown)."""

    def apply(self, config: dict, digest: str) -> None:
        """Replace the whole serve config."""

    def recheck(self) -> str | None:
        """The periodic check (observe.CONFIG_CHECK_S): what keeping the applied config
        in place needs, then applied_hash()."""

    def statuses(self) -> dict[str, AppStatus]:
        """Application (pool) name -> status, for the config applied last."""

