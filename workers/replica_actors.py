"""Calls on a Serve deployment's replicas by replica id, straight to each replica's actor.

A call pinned to a known replica (a draft replica holding a sequence's draft KV, a holder of KV
pages a pull asks for) needs no routing decision: it goes to the replica's actor handle and runs
inside the replica's request wrapper (`handle_request`: its concurrency limit, metrics and request
context), as after a DeploymentHandle's routing. The result travels as the actor call's return
value: a numpy buffer in it moves out of band through the object store, as in a plain actor call.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class _ActorCall:
    """A direct call in flight (the `PendingCall` of workers/spec/draft_client.py)."""

    direct = True

    def __init__(self, ref):
        self.ref = ref

    def result(self, timeout_s: float | None = None):
        import ray

        return ray.get(self.ref, timeout=timeout_s)

    def cancel(self) -> None:
        import ray

        ray.cancel(self.ref)


class ReplicaActors:
    """Calls on one deployment's Serve replicas by replica id, through each replica's actor handle:
    the method runs inside the replica's request wrapper (`handle_request`: its concurrency limit,
    metrics and request context), as after a DeploymentHandle's routing, but without one. A replica
    whose actor cannot be found is answered None (the caller routes through the handle); a call to a
    replica that died fails like any failed call (the client then re-routes its sequences)."""

    def __init__(self, app_name: str, deployment_name: str):
        self.app_name = app_name
        self.deployment_name = deployment_name
        self._actors: dict[str, object] = {}

    def call(self, replica_id: str, method: str, *args) -> _ActorCall | None:
        import pickle
        import uuid

        from ray.serve._private.common import RequestMetadata

        actor = self.actor(replica_id)
        if actor is None:
            return None
        request_id = uuid.uuid4().hex
        metadata = RequestMetadata(request_id, request_id, call_method=method, app_name=self.app_name)
        return _ActorCall(actor.handle_request.remote(pickle.dumps(metadata), *args))

    def actor(self, replica_id: str):
        """The actor handle of `replica_id` (looked up once: blocking), or None if there is none."""
        if replica_id not in self._actors:
            import ray
            from ray.serve._private.common import DeploymentID, ReplicaID
            from ray.serve._private.constants import SERVE_NAMESPACE

            name = ReplicaID(replica_id, DeploymentID(self.deployment_name, self.app_name)).to_full_id_str()
            try:
                self._actors[replica_id] = ray.get_actor(name, namespace=SERVE_NAMESPACE)
            except ValueError:  # not (or no longer) a live replica: route through the handle
                logger.debug("no actor named %s: its calls go through the handle", name)
                self._actors[replica_id] = None
        return self._actors[replica_id]
