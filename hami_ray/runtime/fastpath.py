"""The placement actor's fast path (see :mod:`hami_ray.wire`): ``acquire``, ``release`` and ``ping``
on a socket of its node's address, published with a fresh secret in Ray's internal KV store at every
start; drivers use it for ``hami_ray.lease()`` and for opening and closing lanes, and fall back to Ray
calls where it cannot be reached."""

from __future__ import annotations

import json
import logging
from typing import Any

import ray
import ray.experimental.internal_kv as kv

from hami_ray.wire import AsyncServer, SyncClient, WireError

log = logging.getLogger(__name__)

KV_KEY = "placement-fastpath"
KV_NAMESPACE = "hami-ray"


async def serve(server: AsyncServer, host: str) -> None:
    """Start ``server`` on ``host`` and publish where it is."""
    address = await server.start(host)
    kv._internal_kv_put(KV_KEY, json.dumps({"host": address[0], "port": address[1], "secret": server.secret}),
                        overwrite=True, namespace=KV_NAMESPACE)


def _locate() -> tuple[str, int, str]:
    raw = kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
    if not raw:
        raise WireError("the placement actor has not published a fast path")
    where = json.loads(raw)
    return str(where["host"]), int(where["port"]), str(where["secret"])


class PlacementCalls:
    """Calls to the placement actor: over the fast path, or as Ray calls where it cannot be reached."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.fast = SyncClient(_locate)

    def call(self, op: str, **args: Any) -> Any:
        """``op`` on the placement actor. A waiting ``acquire`` may wait in the queue for as long as it takes:
        the fast path only tries it without waiting, and the queue is joined by a Ray call, so no socket call
        ever waits on the queue (and every fast-path call can be bounded)."""
        waits = op == "acquire" and args.get("wait", True)
        try:
            got = self.fast.call(op, **({**args, "wait": False} if waits else args))
            if not (waits and isinstance(got, dict) and "waiting" in got):
                return got
        except WireError as exc:
            log.debug("placement fast path: %s; using a Ray call", exc)
        return ray.get(getattr(self.handle, op).remote(**args))

    def close(self) -> None:
        self.fast.close_idle()
