"""The gateway's response cache in a real Redis (Debian's redis-server, started here on a free loopback
port with maxmemory and allkeys-lru, stopped by its pid): hits are byte-identical and never reach
Triton, two gateway replicas share them, entries expire, Redis evicts under memory pressure while the
gateway keeps writing, and sampled, failed or abandoned answers are never stored."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time

import pytest

from e2e_helpers import STORIES, need

pytestmark = pytest.mark.slow

TTL_S = 3
PREFIX = "tritonchat:gateway:v1:"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    import redis

    from tritonchat.server import free_ports

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found on PATH (Debian package redis-server: apt-get install -y redis-server)")
    port = free_ports(1)[0]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def r(redis_url):
    import redis

    return redis.Redis.from_url(redis_url)


def _gateway(stories_server, redis_url):
    from tritonchat.gateway import GatewayConfig
    from tritonchat.gateway.process import GatewayProcess

    return GatewayProcess(GatewayConfig(triton_url=stories_server.grpc_url, port=0, cache=redis_url,
                                        cache_ttl_s=TTL_S))


@pytest.fixture(scope="module")
def gateway(stories_server, redis_url):
    need(STORIES)
    with _gateway(stories_server, redis_url) as gw:
        yield gw


def _post(gw, body: dict, headers=None):
    conn = http.client.HTTPConnection(gw.config.host, gw.config.port, timeout=60)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, resp.getheader("x-cache"), raw, time.perf_counter() - t0
    finally:
        conn.close()


def _keys(r):
    return [k for k in r.scan_iter(match=PREFIX + "*")]


def _ensemble_requests(stories_server) -> float:
    from tritonchat.gateway.process import metric, scrape

    return metric(scrape(stories_server.metrics_url), "nv_inference_request_success", model="ensemble")


STORY = {"model": "ensemble", "prompt": "Once upon a time, in a big forest,", "max_tokens": 64, "temperature": 0}


def test_a_repeated_request_is_served_from_redis_byte_identical(gateway, r, stories_server, redis_url):
    r.flushdb()
    status, cache, miss, t_miss = _post(gateway, STORY)
    assert (status, cache) == (200, "miss")
    [key] = _keys(r)
    assert 0 < r.ttl(key) <= TTL_S
    before = _ensemble_requests(stories_server)
    status, cache, hit, t_hit = _post(gateway, STORY)
    assert (status, cache) == (200, "hit")
    a, b = json.loads(miss), json.loads(hit)
    assert json.dumps(a["choices"], ensure_ascii=False).encode() == json.dumps(b["choices"], ensure_ascii=False).encode()
    assert a["usage"] == b["usage"] and a["usage"]["completion_tokens"] > 0
    # a second gateway (another replica) finds it in Redis too; a streamed hit streams the same text
    with _gateway(stories_server, redis_url) as other:
        status, cache, raw, t_other = _post(other, {**STORY, "stream": True})
    assert (status, cache) == (200, "hit")
    events = [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events).encode() == a["choices"][0]["text"].encode()
    assert _ensemble_requests(stories_server) == before  # no hit reached Triton
    print(f"miss {t_miss * 1e3:.1f} ms, hit {t_hit * 1e3:.1f} ms, other replica's streamed hit {t_other * 1e3:.1f} ms")


def test_entries_expire_after_their_ttl(gateway, r):
    r.flushdb()
    body = {**STORY, "max_tokens": 20}
    assert _post(gateway, body)[1] == "miss"
    assert _post(gateway, body)[1] == "hit"
    time.sleep(TTL_S + 0.5)
    assert not _keys(r)
    assert _post(gateway, body)[1] == "miss"


def test_sampled_failed_and_abandoned_answers_are_never_stored(gateway, r):
    r.flushdb()
    assert _post(gateway, {**STORY, "temperature": 0.9})[1] == "bypass"
    assert _post(gateway, {**STORY, "temperature": 0.9, "seed": 3})[1] == "miss"  # a fixed seed is deterministic
    assert len(_keys(r)) == 1
    r.flushdb()
    status, *_ = _post(gateway, {**STORY, "prompt": "Once upon a time " * 200})  # Triton refuses: too long
    assert status == 400
    conn = http.client.HTTPConnection(gateway.config.host, gateway.config.port, timeout=60)
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({**STORY, "max_tokens": 500, "min_tokens": 500, "stream": True}).encode())
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.close()  # abandoned mid-stream
    time.sleep(1.0)
    assert not _keys(r)


def test_redis_evicts_under_memory_pressure_and_the_gateway_keeps_writing(gateway, r):
    """allkeys-lru at maxmemory: Redis evicts for a plain SET (a MULTI/EXEC write would be refused)."""
    r.flushdb()
    assert _post(gateway, {**STORY, "max_tokens": 30})[1] == "miss"
    [old] = _keys(r)
    filler = b"x" * (256 * 1024)
    evicted0 = r.info("stats")["evicted_keys"]
    for i in range(200):  # 50 MB offered to an 8 MB Redis
        r.set(f"filler:{i}", filler)
        if not r.exists(old):
            break
    assert not r.exists(old), "the least recently used answer was never evicted"
    assert r.info("stats")["evicted_keys"] > evicted0
    body = {**STORY, "max_tokens": 31}
    assert _post(gateway, body)[1] == "miss"  # written at maxmemory
    assert _post(gateway, body)[1] == "hit"
