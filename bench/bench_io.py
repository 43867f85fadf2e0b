"""What the Ray benchmarks share: a local Ray with hami-ray on simulated devices, and the report."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def local_hami(simulate: str, **ray_kwargs: Any) -> Iterator[None]:
    """A new local Ray on 127.0.0.1 (2 CPUs, no dashboard) with hami-ray simulating ``simulate`` on it;
    both stopped at the end."""
    import ray  # noqa: PLC0415

    from hami_ray.runtime import api  # noqa: PLC0415
    from hami_ray.runtime.loopback import LOOPBACK, pin_ray_to_loopback  # noqa: PLC0415

    pin_ray_to_loopback()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address=LOOPBACK,
             log_to_driver=False, configure_logging=False, **ray_kwargs)
    try:
        api.init(simulate=simulate, state_root=tempfile.mkdtemp(prefix="hami-bench-"))
        yield
    finally:
        api.shutdown()
        ray.shutdown()


def report(result: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(result, indent=1)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
