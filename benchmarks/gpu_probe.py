"""Probe BYTES inputs on the GPU machine with the wheel's tritonserver (debugging aid)."""
import json
import sys
import urllib.request

from tritonchat.client import ChatClient
from tritonchat.server import TritonServer

repo, extra = sys.argv[1], sys.argv[2:]
with TritonServer(repo, extra_args=extra) as srv:
    for proto, url in (("http", srv.http_url), ("grpc", srv.grpc_url)):
        for text in ("Hi", "Once upon a time " * 30):
            try:
                with ChatClient(url, protocol=proto) as c:
                    out = c.generate(text, max_tokens=4)
                print(proto, len(text), "ok", out.num_input_tokens, out.finish_reason, flush=True)
            except Exception as exc:
                print(proto, len(text), "FAILED", type(exc).__name__, str(exc)[:200], flush=True)
                print(srv.log_text()[-1500:])
                sys.exit(1)
