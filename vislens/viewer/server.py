"""The explorer's local web server: stdlib ``ThreadingHTTPServer``, JSON endpoints, static page.

One server serves the command line (``vislens view``, blocking) and notebooks
(:func:`vislens.view`, on a background thread, shown in an iframe). Routes:

=======================  ===============================================================
``/``                    the page (``static/index.html``); ``/static/*`` its JS and CSS
``/api/meta``            file facts: layers, heads, grid, conditions, relations
``/api/samples``         filtered sample list (``condition, base, relation, outcome,
                         changed, cmin, cmax``)
``/api/sample``          one sample (``row``): question, options, boxes, results per condition
``/api/maps``            before/after maps and their difference (``row, a, b, layer, head,
                         scale, range``)
``/api/share``           per-layer image-attention share of a ``condition``
``/api/auroc``           per-layer AUROC of a ``condition`` (computed once, then cached)
``/api/image``           the sample's image file (``row``)
=======================  ===============================================================

Bad parameters answer ``400 {"error": "..."}`` with the same one-line messages as the CLI.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from ..errors import VislensError
from .data import ViewerData

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
_STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
           "style.css": "text/css; charset=utf-8", "colormaps.js": "text/javascript; charset=utf-8"}


def _static(name: str) -> bytes:
    return resources.files("vislens.viewer").joinpath("static", name).read_bytes()


class _Query:
    """Typed access to query parameters; bad values raise one-line VislensErrors."""

    def __init__(self, query: str) -> None:
        self.q = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}

    def str(self, name: str, default: str | None = None) -> str | None:
        v = self.q.get(name)
        return default if v is None or v == "" else v

    def int(self, name: str, default: int | None = None, *, required: bool = True) -> int | None:
        v = self.q.get(name)
        if v is None or v == "":
            if default is None and required:
                raise VislensError(f"missing parameter {name!r}")
            return default
        try:
            return int(v)
        except ValueError:
            raise VislensError(f"parameter {name}={v!r}: expected an integer") from None

    def float(self, name: str) -> float | None:
        v = self.q.get(name)
        if v is None or v == "":
            return None
        try:
            x = float(v)
        except ValueError:
            raise VislensError(f"parameter {name}={v!r}: expected a number") from None
        if x != x:  # NaN compares false with everything: the filter would match nothing
            raise VislensError(f"parameter {name}={v!r}: expected a number, not NaN")
        return x

    def head(self) -> int | None:
        v = self.q.get("head", "mean")
        return None if v in ("", "mean") else self.int("head")


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, no port) means this machine only."""
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_allowed(bound: str, header: str | None) -> bool:
    """Whether a request's ``Host`` header may be answered by a server bound to ``bound``.

    A server on a loopback address answers only requests addressed to a loopback name
    (``localhost``, ``127.0.0.1``, ``[::1]``, any port: ``ssh -L`` forwarding keeps working).
    A web page elsewhere can point its own host name at 127.0.0.1 (DNS rebinding) and then
    read every endpoint as same-origin; its requests carry that foreign name and are refused.
    A server bound to another address is reachable under names vislens cannot know, so it
    answers every ``Host`` (``--host`` exposes it anyway; see docs/view.md). Requests without
    a ``Host`` header (not sent by browsers) are answered.
    """
    if header is None or not _is_loopback(bound):
        return True
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]+)?", header.strip())
    return m is not None and _is_loopback(m.group(1).strip("[]"))


def _routes(data: ViewerData) -> dict[str, Callable[[_Query], Any]]:
    return {
        "/api/meta": lambda q: data.meta(),
        "/api/samples": lambda q: data.sample_list(
            q.str("condition", data.baseline), q.str("base"), relation=q.str("relation"),
            outcome=q.str("outcome"), changed=q.str("changed"), conf_min=q.float("cmin"),
            conf_max=q.float("cmax"), limit=q.int("limit", 2000)),
        "/api/sample": lambda q: data.sample(q.int("row")),
        "/api/maps": lambda q: data.maps(q.int("row"), q.str("a", data.baseline),
                                         q.str("b", data.baseline), q.int("layer"), q.head(),
                                         q.str("scale", "share"), q.str("range", "robust")),
        "/api/share": lambda q: data.share_curve(q.str("condition", data.baseline)),
        "/api/auroc": lambda q: data.auroc_curve(q.str("condition", data.baseline)),
    }


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes, kind: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json")

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        host = self.headers.get("Host")
        if not host_allowed(self.server.server_address[0], host):
            return self._json(403, {"error": f"Host {host!r} is not this machine: vislens view "
                                             "answers only localhost / 127.0.0.1 / [::1]"})
        try:
            if path in ("/", "/index.html"):
                return self._send(200, _static("index.html"), _STATIC["index.html"])
            if path.startswith("/static/"):
                name = path[len("/static/"):]
                if name not in _STATIC:
                    return self._json(404, {"error": f"no static file {name!r}"})
                return self._send(200, _static(name), _STATIC[name])
            q = _Query(url.query)
            if path == "/api/image":
                body, kind = self.server.data.image_bytes(q.int("row"))
                return self._send(200, body, kind, cache=True)
            route = self.server.routes.get(path)
            if route is None:
                return self._json(404, {"error": f"no such page: {path}"})
            return self._json(200, route(q))
        except VislensError as exc:
            return self._json(400, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as exc:  # one line to the page; the server keeps running
            msg = str(exc).splitlines()[0] if str(exc) else ""
            return self._json(500, {"error": f"{type(exc).__name__}: {msg}"})

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], data: ViewerData, verbose: bool) -> None:
        self.data = data
        self.routes = _routes(data)
        self.verbose = verbose
        super().__init__(addr, _Handler)


class ViewerServer:
    """A running (or ready to run) explorer of one capture file on ``host:port``.

    Opens the capture read-only first (a file that is not a capture fails before anything
    listens), then binds; ``port=0`` picks a free port. ``url`` is where to point a browser.
    """

    def __init__(self, path: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 *, verbose: bool = False) -> None:
        if not 0 <= int(port) <= 65535:
            raise VislensError(f"--port {port}: expected 0-65535")
        self.data = ViewerData(path)
        try:
            self.httpd = _Server((host, int(port)), self.data, verbose)
        except OSError as exc:
            self.data.close()
            if exc.errno == errno.EADDRINUSE:
                raise VislensError(f"port {port} on {host} is already in use (choose another "
                                   "with --port, or --port 0 for any free port)") from None
            raise VislensError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C) or :meth:`close`; then release the file."""
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()
            self.data.close()

    def start(self) -> "ViewerServer":
        """Serve on a daemon thread (notebooks, tests) and return at once."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"vislens-view-{self.port}",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the capture."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        else:
            self.httpd.server_close()
            self.data.close()

    def __enter__(self) -> "ViewerServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ViewerServer({str(self.data.path)!r}, url={self.url!r})"
