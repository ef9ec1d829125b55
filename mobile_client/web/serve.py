"""Serve the web edge client, a bundle and a few images; receive update files (stdlib only).

``python -m mobile_client.web.serve --bundle BUNDLE_DIR [--data DIR] [--updates DIR]``
serves, on 127.0.0.1:8000 by default:

* ``/`` the page (``index.html``) and its modules (this directory);
* ``/ort/`` onnxruntime-web's build (``node_modules/onnxruntime-web/dist``, from ``npm ci``);
* ``/bundle/`` the exported bundle (``manifest.json`` and the files it names);
* ``/data/`` images and a ``data.json`` naming them with their labels (optional);
* ``POST /update`` an update file: checked with :func:`mobile_client.update.read_update`
  (format, metadata, dtypes, finite values) and saved under ``--updates`` as
  ``update_<client>_<n>.safetensors``; the answer is JSON (``{"path", "client_id",
  "num_examples"}``, or ``{"error"}`` with status 400).

Only GET/HEAD of files under those roots and that one POST are answered.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import tempfile
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mobile_client.errors import FMTLError, UpdateError, error_line
from mobile_client.update import read_update

WEB_DIR = Path(__file__).resolve().parent
ORT_DIST = WEB_DIR / "node_modules" / "onnxruntime-web" / "dist"
MAX_UPDATE_BYTES = 256 << 20


class EdgeWebServer(ThreadingHTTPServer):
    """The HTTP server of the page: ``roots`` maps a URL prefix to a directory."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        bundle: Path,
        data: Path | None = None,
        updates: Path | None = None,
    ) -> None:
        self.roots: dict[str, Path] = {"/ort/": ORT_DIST, "/bundle/": Path(bundle).resolve()}
        if data is not None:
            self.roots["/data/"] = Path(data).resolve()
        self.roots["/"] = WEB_DIR
        self.updates = Path(updates or tempfile.mkdtemp(prefix="fmtl-updates-")).resolve()
        self.updates.mkdir(parents=True, exist_ok=True)
        self.received: list[Path] = []
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"http://{name}:{port}/"

    def save_update(self, body: bytes) -> dict[str, object]:
        """Check an update's bytes with the server's reader and keep it; raises FMTLError."""
        with self._lock:
            n = next(self._counter)
        tmp = self.updates / f".incoming_{n}.safetensors"
        tmp.write_bytes(body)
        try:
            arrays, meta = read_update(tmp)
        except FMTLError as exc:  # name the upload, not the server's file
            tmp.unlink()
            raise UpdateError(error_line(exc).replace(str(tmp), "the update")) from exc
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", meta.client_id)[:64]
        path = self.updates / f"update_{name}_{n}.safetensors"
        tmp.replace(path)
        with self._lock:
            self.received.append(path)
        return {"path": str(path), "client_id": meta.client_id, "num_examples": meta.num_examples,
                "keys": len(arrays)}  # fmt: skip


class _Handler(SimpleHTTPRequestHandler):
    server: EdgeWebServer
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
        ".onnx": "application/octet-stream",
        ".npz": "application/octet-stream",
    }

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def translate_path(self, path: str) -> str:
        path = path.split("?", 1)[0].split("#", 1)[0]
        for prefix, root in self.server.roots.items():
            if path.startswith(prefix):
                self.directory = str(root)
                return super().translate_path("/" + path[len(prefix) :])
        return str(WEB_DIR / "__none__")

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def list_directory(self, path):  # type: ignore[no-untyped-def]
        self.send_error(HTTPStatus.NOT_FOUND, "no directory listings")
        return None

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/update":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no POST endpoint {self.path}"})
            return
        size = int(self.headers.get("Content-Length") or 0)
        if not 0 < size <= MAX_UPDATE_BYTES:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"an update of {size} bytes"})
            return
        try:
            self._json(HTTPStatus.OK, self.server.save_update(self.rfile.read(size)))
        except FMTLError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": error_line(exc)})

    def _json(self, status: HTTPStatus, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mobile_client.web.serve", description=__doc__)
    p.add_argument("--bundle", required=True, type=Path, help="an exported bundle directory")
    p.add_argument("--data", type=Path, default=None, help="images + data.json for the page")
    p.add_argument("--updates", type=Path, default=Path("updates"), help="where POSTs go")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file():
        p.error(f"--bundle {args.bundle}: no manifest.json there")
    if not ORT_DIST.is_dir():
        p.error(f"{ORT_DIST} is missing: run `npm ci` in {WEB_DIR} (or `make setup`)")
    srv = EdgeWebServer((args.host, args.port), args.bundle, args.data, args.updates)
    print(f"serving the edge page at {srv.url} (updates go to {srv.updates}); Ctrl-C stops")
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
