"""`rayservice` backend: write the config into `spec.serveConfigV2` (a YAML string) of a
KubeRay RayService and read the applications' status KubeRay reports back.

The config's hash is kept in an annotation of the RayService, so the operator (or a
restarted one) patches only when the content changes; a patch carries the resourceVersion
it read, so a concurrent edit makes it fail (409) and retry instead of being overwritten."""

from __future__ import annotations

import yaml

from deltafleet.operator.backend import AppStatus, BackendError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
HASH_ANNOTATION = "deltafleet.dev/serve-config-hash"


class RayServiceBackend:
    name = "rayservice"

    def __init__(self, namespace: str, name: str, api_client=None):
        from kubernetes import client

        self.namespace, self.rs_name = namespace, name
        self.api = client.CustomObjectsApi(api_client)

    def _get(self) -> dict:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.rs_name)
        except ApiException as e:
            raise BackendError(f"RayService {self.namespace}/{self.rs_name}: HTTP {e.status} {e.reason}") from None

    def applied_hash(self) -> str | None:
        return ((self._get().get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)

    def apply(self, config: dict, digest: str) -> None:
        from kubernetes.client.exceptions import ApiException

        current = self._get()
        patch = {
            "metadata": {"annotations": {HASH_ANNOTATION: digest}, "resourceVersion": current["metadata"]["resourceVersion"]},
            "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)},
        }
        try:
            self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.rs_name, patch)
        except ApiException as e:
            raise BackendError(f"patching RayService {self.namespace}/{self.rs_name}: HTTP {e.status} {e.reason}") from None

    def statuses(self) -> dict[str, AppStatus]:
        """Applications of the active cluster; none until KubeRay has observed the latest spec."""
        rs = self._get()
        status = rs.get("status") or {}
        observed = status.get("observedGeneration")
        if observed is not None and observed < rs["metadata"].get("generation", 0):
            return {}  # KubeRay has not acted on the last patch yet
        apps = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
        return {name: AppStatus(status=a.get("status", "UNKNOWN"), message=a.get("message") or "") for name, a in apps.items()}
