"""`lorakit serve` as a process: it starts, serves, and on SIGTERM stops accepting, lets the request in
flight finish, and exits 0."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from http_fixtures import openai_client

SRC = str(Path(__file__).resolve().parents[3] / "src")


def test_sigterm_finishes_the_request_in_flight_then_exits(tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", "import sys; from lorakit.cli.main import main; sys.exit(main())", "serve",
           "--model", str(tiny_model_dir), "--port", "0", "--precision", "fp32", "--max-seq-len", "4096",
           "--served-model-name", "tiny", "--shutdown-timeout", "60"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:  # "lorakit serve: listening on http://127.0.0.1:PORT; models: tiny"
            match = re.search(r"listening on (http://\S+?);", line)
            if match:
                url = match.group(1)
                break
        assert url, "the server did not start"
        log = []
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
        stream = iter(openai_client(url).completions.create(model="tiny", prompt="Hello", max_tokens=4000, temperature=0,
                                                            stream=True, extra_body={"ignore_eos": True}))
        chunks = [next(stream)]  # in flight
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"  # finished, not cut
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
