"""`lacuna engine --ray`: two CPU replicas of the engine behind one Ray Serve endpoint."""

import asyncio

import httpx
import pytest
import ray
from test_service import free_port

from engine.serving import ray_serve

pytestmark = pytest.mark.slow


@pytest.fixture
def ray_service(constant_checkpoint):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        ray_serve.run(str(constant_checkpoint), "cpu", 2, "127.0.0.1", port, block=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        ray_serve.serve.shutdown()
        ray.shutdown()


async def test_requests_spread_over_both_replicas(ray_service):
    async with httpx.AsyncClient(timeout=120) as client:
        health = (await client.get(f"{ray_service}/health")).json()
        assert health["status"] == "ok" and health["device"] == "cpu"
        answers = []
        for _ in range(6):  # waves of concurrent requests: the router spreads them by queue length
            answers += await asyncio.gather(*[
                client.post(f"{ray_service}/v1/fim/completions", json={"prompt": f"a{i} = ", "max_tokens": 16})
                for i in range(8)])
    assert all(a.status_code == 200 for a in answers)
    assert all(a.json()["choices"][0]["text"] == "x" * 16 for a in answers)
    assert len({a.json()["lacuna"]["pid"] for a in answers}) == 2
