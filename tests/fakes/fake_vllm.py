"""A stand-in for vLLM's server process, for supervisor unit tests.

Started as ``python fake_vllm.py -m vllm.entrypoints.openai.api_server --host H --port P ...``
(the supervisor's command line, with this script in place of the interpreter's -m target).
Behaviour comes from FAKE_VLLM_MODE: ``ok`` serves /v1/models and /health; ``hang`` serves
/v1/models but never answers /health; ``crash`` exits with code 3 at once. Like vLLM, it refuses
/v1/* requests without ``Authorization: Bearer $VLLM_API_KEY`` when that variable is set (401).
"""

import http.server
import os
import sys
import time

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
api_key = os.environ.get("VLLM_API_KEY")
counter = os.environ.get("FAKE_VLLM_COUNTER")
if counter:
    with open(counter, "a") as f:
        f.write("start\n")
print(f"fake vllm starting in mode {mode} on {port}", flush=True)
if mode == "crash":
    sys.exit(3)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health" and mode == "hang":
            time.sleep(3600)
        if api_key and self.path.startswith("/v1") and self.headers.get("Authorization") != f"Bearer {api_key}":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error":"Unauthorized"}')
            return
        body = b'{"object":"list","data":[{"id":"smollm2"}]}' if self.path == "/v1/models" else b"{}"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
