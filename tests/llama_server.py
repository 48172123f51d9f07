"""Start llama.cpp's OpenAI-compatible HTTP server (the ``xllamacpp`` wheel) on 127.0.0.1 for the
endpoint tests: ``python llama_server.py GGUF API_KEY ALIAS``; prints ``LISTENING <url>`` once it
accepts requests, then serves until killed."""

from __future__ import annotations

import sys
import time

import xllamacpp


def main(gguf: str, api_key: str, alias: str) -> None:
    params = xllamacpp.CommonParams()
    params.model.path = gguf
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # the server picks a free port and reports it
    params.api_keys = [api_key]
    params.model_alias = {alias}
    params.n_ctx = 2048
    params.n_parallel = 2
    params.cpuparams.n_threads = 2
    params.cpuparams_batch.n_threads = 2
    server = xllamacpp.Server(params)  # returns once the server listens
    print("LISTENING", server.listening_address, flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:4])
