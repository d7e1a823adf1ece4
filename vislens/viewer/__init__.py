"""``vislens view``: an interactive attention explorer of a capture file, in the browser.

One implementation for two front doors: the command line serves the page until Ctrl-C
(:func:`serve`); a notebook cell (``vislens.view("capture.h5")``, :func:`view`) starts the
same server on a background thread and displays the page in an iframe. See ``docs/view.md``.

Modules: :mod:`.data` reads the capture lazily into JSON-ready values; :mod:`.server` is the
HTTP layer; ``static/`` holds the page (vanilla HTML/JS/CSS, no network at run time).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

from .server import DEFAULT_HOST, DEFAULT_PORT, ViewerServer

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Viewer", "ViewerServer", "serve", "view"]


class Viewer:
    """A running explorer of one capture, for notebooks: shows itself as an iframe.

    ``url`` is the page; :meth:`close` stops the server and releases the file (it also
    stops when the Python process ends).
    """

    def __init__(self, server: ViewerServer, height: int = 860) -> None:
        self.server = server
        self.height = int(height)

    @property
    def url(self) -> str:
        return self.server.url

    def _repr_html_(self) -> str:
        src = html.escape(self.url, quote=True)
        return (f'<iframe src="{src}" width="100%" height="{self.height}" '
                f'style="border:1px solid #ccc;border-radius:4px" '
                f'title="vislens view {html.escape(self.server.data.path.name)}"></iframe>')

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> "Viewer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Viewer({str(self.server.data.path)!r}, url={self.url!r})"


def view(path: str | Path, *, port: int = 0, host: str = DEFAULT_HOST, height: int = 860) -> Viewer:
    """Explore a capture file in a notebook: returns a :class:`Viewer` that displays the page.

    Runs the same server as ``vislens view`` on a background thread (``port=0``: any free
    port) bound to ``host`` (127.0.0.1: reachable from a browser on this machine).
    """
    return Viewer(ViewerServer(path, host, port).start(), height=height)


def serve(path: str | Path, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          open_browser: bool = False, verbose: bool = False,
          log: Callable[[str], None] = print) -> None:
    """Serve the explorer of ``path`` until Ctrl-C (the ``vislens view`` command)."""
    srv = ViewerServer(path, host, port, verbose=verbose)
    log(f"vislens view: serving {srv.data.path} at {srv.url} (Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        webbrowser.open(srv.url)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
