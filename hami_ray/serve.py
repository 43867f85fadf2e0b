"""Ray Serve deployments whose replicas each hold a slice.

    from ray import serve
    import hami_ray

    @hami_ray.serve.deployment(gpu_memory="10GiB", gpu_cores=30, num_replicas=4)
    class Model:
        def __call__(self, request):
            return hami_ray.current_slice().devices

    serve.run(Model.bind())

``hami_ray.serve.deployment`` takes ``serve.deployment``'s own options (``num_replicas``,
``autoscaling_config``, ``ray_actor_options``, ...) plus hami-ray's slice keywords (``gpus``,
``gpu_memory``, ``gpu_cores``, ``gpu_type``, ``isolation``, ``priority``, ...) and returns Serve's own
``Deployment``. Serve places and scales the replicas as always; each replica, before the class's
``__init__`` runs, takes a slice on its node (the node's devices chosen by hami-ray's policy, waiting in
its queue while the node is full) and keeps it until Serve stops it or its process dies. See
:mod:`hami_ray.runtime.replicas`.
"""

from __future__ import annotations

from typing import Any

from hami_ray.core.errors import InvalidRequest
from hami_ray.runtime.replicas import slice_holder, split_options


def deployment(_cls: type | None = None, **options: Any) -> Any:
    """``@serve.deployment`` with a slice per replica (see the module's docstring).

    Raises:
        InvalidRequest: a malformed slice keyword, or Ray's ``num_gpus`` in ``ray_actor_options`` (the
            replica's GPU share is its slice).
        TypeError: a function (a deployment that holds a slice is a class).
    """
    request, serve_options = split_options(options)
    if "num_gpus" in (serve_options.get("ray_actor_options") or {}):
        raise InvalidRequest("ray_actor_options", "num_gpus is Ray's bookkeeping; the replica's slice replaces it "
                                                  "(give num_gpus=f to hami_ray.serve.deployment for a fraction)")

    def decorate(cls: type) -> Any:
        if not isinstance(cls, type):
            raise TypeError("hami_ray.serve.deployment takes a class: a replica holds its slice for its life")
        from ray import serve  # noqa: PLC0415 - Serve loads only where it is used

        return serve.deployment(slice_holder(cls, request), **serve_options)

    if _cls is not None:
        return decorate(_cls)
    return decorate


__all__ = ["deployment"]
