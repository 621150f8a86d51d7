"""`tritonchat serve --openai-port`: the OpenAI gateway beside the supervised tritonserver, answered
by the official `openai` client, stopped with it (no process left)."""

from __future__ import annotations

import signal
import time

import pytest

from serve_helpers import Serve, alive, http_status

pytestmark = pytest.mark.slow


def test_serve_with_openai_port_answers_the_openai_sdk_and_stops_cleanly(stories_repo, tmp_path):
    import openai

    from tritonchat.server import free_ports

    (port,) = free_ports(1)
    serve = Serve(stories_repo, tmp_path, "--openai-port", str(port)).start()
    try:
        deadline = time.time() + 60
        while http_status(f"http://127.0.0.1:{port}/health/ready") != 200:
            assert time.time() < deadline, serve.err()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        answer = client.chat.completions.create(model="ensemble", max_tokens=12,
                                                messages=[{"role": "user", "content": "Once upon a time"}])
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 12
        chunks = client.completions.create(model="ensemble", prompt="Once upon a time", max_tokens=8, stream=True)
        assert "".join(c.choices[0].text for c in chunks).strip()
        gateway_pids = [p for p in serve_children(serve) if "tritonchat.gateway" in cmdline(p)]
        assert gateway_pids, "the gateway is not a child process of serve"
    finally:
        serve.signal(signal.SIGINT)
        rc = serve.stop()
    assert rc == 0
    assert not any(alive(p) for p in gateway_pids)
    assert http_status(f"http://127.0.0.1:{port}/health/live") is None


def serve_children(serve: Serve) -> list[int]:
    from serve_helpers import children

    return children(serve.proc.pid)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
