"""The dashboard's web app (Flask) and the local server that runs it.

Routes (all GET):
  /                        the page (static/index.html); it draws with Plotly
  /static/<file>           app.js and style.css from this package, plotly.min.js from the
                           installed `plotly` package: nothing is fetched from the internet
  /api/layout              the panels and metric names to draw (from braid.metrics.names)
  /api/runs                the registry's runs, newest first
  /api/data?run=ID&rank=R[&have=T]  one run's plot data (see data.py); `have` = the read_at
                           of the answer the page holds: "unchanged" while nothing newer
  /api/diff?a=ID&b=ID      config keys whose values differ between two runs

Errors are JSON `{"error": ...}`: 400 for an id that would leave the run root or a bad rank,
404 for an id the registry does not know. Every response carries a Content-Security-Policy
that allows only this origin. When the server listens on a loopback address, requests must
name a loopback host (a DNS-rebinding page cannot read the runs through the browser).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from flask import Flask, Response, jsonify, request

from braid.dash.data import DashData, UnknownRun, layout
from braid.errors import BraidError

_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
}
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(root: str | Path, *, local_only: bool = True, poll_ms: int = 2000) -> Flask:
    """The app over run root `root`; `local_only` refuses requests for a non-loopback Host."""
    app = Flask("braid.dash", static_folder=None)
    data = DashData(root)
    assets = {name: _package_file(name) for name in _STATIC}
    plotly_js = _plotly_js()

    @app.before_request
    def _check_host() -> Any:
        if local_only and not is_loopback(_hostname(request.host)):
            return _error(403, f"host {request.host!r} refused: this server answers loopback only")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = _CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        if request.path.startswith("/api/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/")
    def index() -> Response:
        return Response(assets["index.html"], mimetype="text/html")

    @app.get("/static/<name>")
    def static_file(name: str) -> Any:
        if name == "plotly.min.js":
            resp = Response(plotly_js, content_type="text/javascript; charset=utf-8")
            resp.headers["Cache-Control"] = "max-age=3600"
            return resp
        if name not in _STATIC or name == "index.html":
            return _error(404, f"no static file {name!r}")
        return Response(assets[name], content_type=_STATIC[name])

    @app.get("/api/layout")
    def api_layout() -> Response:
        return jsonify({**layout(), "poll_ms": poll_ms, "root": str(root)})

    @app.get("/api/runs")
    def api_runs() -> Response:
        return jsonify({"runs": data.runs()})

    @app.get("/api/data")
    def api_data() -> Any:
        rank = request.args.get("rank", "0")
        if not rank.isdigit():
            return _error(400, f"rank={rank!r}: expected a non-negative integer")
        try:
            have = float(request.args["have"]) if "have" in request.args else None
        except ValueError:
            return _error(400, f"have={request.args['have']!r}: expected a number")
        return _answer(lambda: data.run_data(request.args.get("run", ""), int(rank), have))

    @app.get("/api/diff")
    def api_diff() -> Any:
        a, b = request.args.get("a", ""), request.args.get("b", "")
        return _answer(lambda: {"a": a, "b": b, "diff": data.diff(a, b)})

    return app


def _answer(fn: Any) -> Any:
    try:
        return jsonify(fn())
    except UnknownRun as e:
        return _error(404, str(e))
    except BraidError as e:  # UnsafeRun, a bad rank
        return _error(400, str(e))


def _error(code: int, message: str) -> Response:
    resp = jsonify({"error": message})
    resp.status_code = code
    return resp


def _package_file(name: str) -> bytes:
    return resources.files("braid.dash").joinpath("static", name).read_bytes()


def _plotly_js() -> bytes:
    """The plotly.js bundle shipped inside the `plotly` Python package."""
    return resources.files("plotly").joinpath("package_data", "plotly.min.js").read_bytes()


def _hostname(host: str) -> str:
    """`host` of a Host header without its port: 'localhost:8050' -> 'localhost'."""
    if host.startswith("["):  # [::1]:8050
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; a bad port or address is a one-line BraidError."""
    from werkzeug.serving import get_sockaddr, select_address_family

    if not 0 <= port <= 65535:
        raise BraidError(f"--port {port}: expected 0..65535 (0 picks a free port)")
    family = select_address_family(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(get_sockaddr(host, port, family))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise BraidError(
            f"cannot listen on {host}:{port}: {e.strerror or e}: try another --port or --host"
        ) from None
    return sock


def serve(
    root: str | Path,
    host: str = "127.0.0.1",
    port: int = 8050,
    *,
    allow_remote: bool = False,
    out: TextIO = sys.stderr,
) -> None:
    """Serve the dashboard until Ctrl-C. A non-loopback `host` needs `allow_remote`."""
    root = Path(root)
    if not root.is_dir():
        raise BraidError(f"run root {root} is not a directory: pass the run.dir of your runs")
    local = is_loopback(host)
    if not local and not allow_remote:
        raise BraidError(
            f"--host {host} is not a loopback address: add --allow-remote to listen on it "
            "(the dashboard has no login; anyone who reaches the port reads your runs)"
        )
    from werkzeug.serving import make_server

    app = create_app(root, local_only=local)
    sock = _listen(host, port)  # bound here, so a refusal is one line (werkzeug would exit)
    try:
        server = make_server(host, port, app, threaded=True, fd=sock.fileno())
    finally:
        sock.close()  # the server holds its own duplicate
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    if not local:
        print(
            f"warning: listening on {host}:{port} without authentication: anyone who can "
            "reach this port can read the runs",
            file=out,
        )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"braid dash: {root.resolve()} at http://{shown}:{server.port}/ (Ctrl-C stops)",
        file=out,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
