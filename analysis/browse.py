"""``lexica browse``: serve a run's feature-atlas site over HTTP on this machine, and talk to its model.

The site also works opened straight from disk (``file://``). Served, and with the run's model
loaded (``analysis.live``), its pages add *test your text* and *steer*. Only the site folder and
the ``/api/`` routes are served, on loopback unless ``--host`` says otherwise; every request's
Host header must name this server (a page on another site cannot reach it through DNS
rebinding), and a POST from a page of another origin is refused.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import shutil
import sys
import tempfile
import threading
import webbrowser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lexica import storage
from lexica.analysis.site import SITE_FOLDER
from lexica.errors import LexicaError
from lexica.run import Run


class BrowseError(LexicaError, ValueError):
    """The site to browse cannot be found or served (message says what to do)."""


MAX_BODY_BYTES = 65536


class _SiteHandler(SimpleHTTPRequestHandler):
    """Files of one folder plus the model routes; no request log on stderr (the command prints its own URL)."""

    live = None  # analysis.live.LiveModel, or None: the site alone
    allowed_hosts: frozenset[str] = frozenset()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def end_headers(self) -> None:
        # A rebuilt site must show at once, not a cached page from the previous build.
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def _answer(self, status: int, document: dict) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _host_allowed(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        if host in self.allowed_hosts:
            return True
        self._answer(403, {"error": f"Host {host!r} is not this server's address; requests that name it "
                                    "otherwise are refused (DNS rebinding)"})
        return False

    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        if self.path.split("?")[0] == "/api/status":
            self._answer(200, {"live": self.live.status() if self.live is not None else None})
            return
        super().do_GET()

    def do_HEAD(self) -> None:
        if self._host_allowed():
            super().do_HEAD()

    def do_POST(self) -> None:
        from lexica.analysis.live import RequestError

        if not self._host_allowed():
            return
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower().removeprefix("http://") not in self.allowed_hosts:
            self._answer(403, {"error": f"a page from {origin} may not use this server's model"})
            return
        route = self.path.split("?")[0]
        if route not in ("/api/tokens", "/api/steer"):
            self._answer(404, {"error": f"no route {route}; POST /api/tokens or /api/steer"})
            return
        if self.live is None:
            self._answer(503, {"error": "this server has no model loaded: start `lexica browse` where the run's "
                                        "model can be loaded (without --no-model)"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._answer(413 if length > MAX_BODY_BYTES else 400,
                         {"error": f"a request body of 1 to {MAX_BODY_BYTES:,} bytes of JSON is expected"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict):
                raise RequestError("the request body must be a JSON object")
            if route == "/api/tokens":
                answer = self.live.tokens(request.get("text"), _integer("feature", request.get("feature"), True))
            else:
                new_tokens = request.get("max_new_tokens", min(24, self.live.limits.max_new_tokens))
                answer = self.live.steer(_integer("feature", request.get("feature")), request.get("value", "2x"),
                                         request.get("prompt"), _integer("max_new_tokens", new_tokens))
        except json.JSONDecodeError as error:
            self._answer(400, {"error": f"the request body is not JSON: {error}"})
        except RequestError as error:
            self._answer(error.status, {"error": str(error)})
        except LexicaError as error:
            self._answer(400, {"error": str(error)})
        else:
            self._answer(200, answer)


def _integer(name: str, value: object, optional: bool = False) -> int | None:
    """A request field that must be an integer (``None`` for an optional one left out)."""
    from lexica.analysis.live import RequestError

    if optional and value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} = {value!r}; an integer is expected") from None


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """Host header values naming this server: its own address, and the loopback names when it listens there."""
    names = {f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    if is_loopback(host) or host in ("0.0.0.0", "::", ""):
        names |= {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    return frozenset(name.lower() for name in names)


def serve(site_dir: str | Path, host: str = "127.0.0.1", port: int = 0, live=None) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``site_dir`` (and, with ``live``, its model routes) from a background thread; port 0 picks
    a free port. Returns the server and its URL. Stop it with ``server.shutdown(); server.server_close()``.
    """
    folder = Path(site_dir).resolve()
    if not (folder / "index.html").is_file():
        raise BrowseError(f"{folder} has no index.html; build the site first (lexica analysis features)")
    handler = type("SiteHandler", (_SiteHandler,), {"live": live})
    server = ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    handler.allowed_hosts = allowed_hosts(str(bound_host), int(bound_port))
    thread = threading.Thread(target=server.serve_forever, name="lexica-browse", daemon=True)
    thread.start()
    shown_host = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    return server, f"http://{shown_host}:{bound_port}/index.html"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit; main() reports and returns 2 instead
        raise BrowseError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lexica browse",
                     description="Serve a run's feature-atlas site (<run>/analysis/<dictionary>/site) over HTTP.")
    parser.add_argument("--run", required=True, help="run folder URL (local path, file:// or s3://)")
    parser.add_argument("--dictionary", default=None, help="dictionary name (default: the newest export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    parser.add_argument("--open", action="store_true", help="open the index in a web browser")
    parser.add_argument("--print-path", action="store_true",
                        help="print the site's index.html path and exit without serving")
    parser.add_argument("--no-model", action="store_true",
                        help="serve the site alone, without loading the run's model (no test-your-text or steering)")
    parser.add_argument("--device", default="auto", help="device of the model: auto (CUDA when present), cpu, cuda")
    parser.add_argument("--max-text", type=int, default=2000, help="longest text or prompt accepted, in characters")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens one steering request generates")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a steering request may generate for before it is cut short")
    return parser


def resolve_site(run_url: str, dictionary: str | None, storage_options: dict | None = None) -> tuple[str, bool]:
    """The site folder's URL of a run's dictionary, and whether it is on this machine's disk."""
    from lexica.analysis.sources import resolve_dictionary_name  # imports torch: only when a run is resolved

    name = resolve_dictionary_name(run_url, dictionary, storage_options)
    site_url = storage.join(Run(run_url, storage_options).atlas_url(name), SITE_FOLDER)
    fs, site_path = storage.url_to_fs(site_url, storage_options)
    if not storage.exists(fs, storage.join(site_path, "index.html")):
        raise BrowseError(f"{site_url} has no index.html: the site of dictionary {name!r} is not built "
                          "(run the analysis with site enabled)")
    return (site_path if storage.is_local(fs) else site_url), storage.is_local(fs)


def _local_copy(site_url: str, storage_options: dict | None) -> Path:
    fs, site_path = storage.url_to_fs(site_url, storage_options)
    folder = Path(tempfile.mkdtemp(prefix="lexica-site-"))
    fs.get(site_path.rstrip("/") + "/", str(folder), recursive=True)
    return folder


def load_live(args: argparse.Namespace):
    """The run's model for the pages' model routes, or None (with the reason on stderr) when it cannot load."""
    from lexica.analysis.live import LiveLimits, LiveModel

    limits = LiveLimits(max_text_chars=args.max_text, max_new_tokens=args.max_new_tokens, timeout_s=args.timeout)
    print("loading the run's model for test-your-text and steering (--no-model skips this)...", file=sys.stderr)
    try:
        return LiveModel(args.run, args.dictionary, args.device, limits)
    except (LexicaError, OSError) as error:
        print(f"warning: serving the site without a model: {error}", file=sys.stderr)
        return None


def main(argv: list[str]) -> int:
    """Run the browse command; ``argv`` is what follows ``browse`` on the command line."""
    copied: Path | None = None
    args = _parser().parse_args(argv)
    try:
        if not 0 <= args.port <= 65535:
            raise BrowseError(f"--port {args.port} is not a port number (0-65535)")
        site, local = resolve_site(args.run, args.dictionary)
        if not local:
            copied = _local_copy(site, None)
            print(f"copied {site} to {copied}")
        site_dir = Path(copied or site).resolve()
        index_path = site_dir / "index.html"
        if args.print_path:
            print(index_path.as_uri())
            return 0  # a copied site stays: the printed path is for opening later
        if not is_loopback(args.host):
            print(f"warning: serving on {args.host} makes the site reachable from other machines on the network",
                  file=sys.stderr)
        for name, value in (("--max-text", args.max_text), ("--max-new-tokens", args.max_new_tokens),
                            ("--timeout", args.timeout)):
            if value <= 0:
                raise BrowseError(f"{name} {value} must be positive")
        live = None if args.no_model else load_live(args)
        try:
            server, url = serve(site_dir, args.host, args.port, live)
        except OSError as error:  # a busy port, an address this machine does not have
            raise BrowseError(f"cannot serve on {args.host}:{args.port}: {error.strerror or error}") from error
    except BaseException:
        if copied:
            shutil.rmtree(copied, ignore_errors=True)
        raise
    print(f"serving {site_dir}\n  {url}\n  {index_path.as_uri()} (opens without a server too)")
    if live is not None:
        print(f"  with model {live.loaded.model_path}: test your text on the index, steer on feature pages")
    print("Ctrl-C stops.")
    if args.open:
        webbrowser.open(url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        if copied:
            shutil.rmtree(copied, ignore_errors=True)
    return 0

