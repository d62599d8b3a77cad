"""`lacuna engine --ray`: the same FIM service as a Ray Serve deployment, N replicas each holding
the model on its own device (a GPU each when there are GPUs), behind one HTTP endpoint.

Ray routes each request to a replica; requests that reach the same replica share its denoising
steps as in a single `lacuna engine`. On a cluster, start Ray on every node (`ray start`) and
run this on the head node: replicas are placed wherever a GPU is free.
"""

from __future__ import annotations

import time

from ray import serve

from ..api import Limits
from ..engine import Engine
from .service import create_app


@serve.ingress()  # the app is built in each replica, around that replica's engine
class EngineReplica:
    def __init__(self, model_dir: str | None, device: str | None, api_key: str | None, limits: Limits):
        self.engine = Engine.load(model_dir, device=device)
        self.api_key, self.limits = api_key, limits

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, api_key=self.api_key, limits=self.limits)


def deployment(model_dir: str | None, device: str | None, replicas: int, api_key: str | None = None,
               limits: Limits = Limits()):
    gpus = 1 if device in (None, "cuda") and _cluster_gpus() >= replicas else 0
    return serve.deployment(EngineReplica, name="lacuna-engine", num_replicas=replicas,
                            ray_actor_options={"num_gpus": gpus, "num_cpus": 1}).bind(
        model_dir, "cuda" if gpus else device or "cpu", api_key, limits)


def _cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def run(model_dir: str | None, device: str | None, replicas: int, host: str, port: int,
        api_key: str | None = None, limits: Limits = Limits(), block: bool = True) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster and serve the engine on host:port."""
    import ray

    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(model_dir, device, replicas, api_key, limits), name="lacuna", route_prefix="/")
    while block:
        time.sleep(3600)
