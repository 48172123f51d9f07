"""``lexica browse``: serve a run's feature-atlas site over HTTP on this machine.

The site also works opened straight from disk (``file://``); serving it is for remote shells and
for browsers that restrict local files. Only the site folder is served, on loopback unless
``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
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


class _SiteHandler(SimpleHTTPRequestHandler):
    """Files of one folder; no request log on stderr (the command prints its own URL)."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def end_headers(self) -> None:
        # A rebuilt site must show at once, not a cached page from the previous build.
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()


def serve(site_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``site_dir`` from a background thread; port 0 picks a free port. Returns the server and its URL.

    Stop it with ``server.shutdown(); server.server_close()``.
    """
    folder = Path(site_dir).resolve()
    if not (folder / "index.html").is_file():
        raise BrowseError(f"{folder} has no index.html; build the site first (lexica analysis features)")
    handler = functools.partial(_SiteHandler, directory=str(folder))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="lexica-browse", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
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
        try:
            server, url = serve(site_dir, args.host, args.port)
        except OSError as error:  # a busy port, an address this machine does not have
            raise BrowseError(f"cannot serve on {args.host}:{args.port}: {error.strerror or error}") from error
    except BaseException:
        if copied:
            shutil.rmtree(copied, ignore_errors=True)
        raise
    print(f"serving {site_dir}\n  {url}\n  {index_path.as_uri()} (opens without a server too)\nCtrl-C stops.")
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

