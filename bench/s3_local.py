"""A moto S3 server on 127.0.0.1 for the benchmarks (loopback only; fake credentials)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from lexica import storage


def start_moto() -> tuple[subprocess.Popen, dict]:
    """A moto S3 server in its own process on 127.0.0.1 (so it does not share this process's GIL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")  # moto accepts any; never real credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"moto server on port {port} did not start") from None
            time.sleep(0.2)
    options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    fs, _ = storage.url_to_fs("s3://lexica-bench", options)
    fs.mkdir("lexica-bench")
    return server, options
