"""A /vsicurl/ input is known by its size, ETag and Last-Modified, so a replaced file is noticed."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mgpr.geo.inputs import remote_identity


class _Handler(http.server.SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        if self.command == "HEAD" and self.path.endswith("etag.tif"):
            self.send_header(
                "ETag", '"v-' + str(os.path.getsize(self.translate_path(self.path))) + '"'
            )
        super().end_headers()

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    handler = functools.partial(_Handler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_replaced_remote_file_gets_another_identity(tmp_path: Path, server: str) -> None:
    target = tmp_path / "etag.tif"
    target.write_bytes(b"x" * 100)
    first = remote_identity(f"/vsicurl/{server}/etag.tif")
    assert first["bytes"] == 100 and first["etag"] == '"v-100"' and first["last_modified"]
    target.write_bytes(b"y" * 120)
    second = remote_identity(f"/vsicurl/{server}/etag.tif")
    assert second["bytes"] == 120 and second["etag"] != first["etag"]


def test_last_modified_alone_is_kept_when_there_is_no_etag(tmp_path: Path, server: str) -> None:
    (tmp_path / "plain.tif").write_bytes(b"z" * 10)
    ident = remote_identity(f"/vsicurl/{server}/plain.tif")
    assert ident["bytes"] == 10 and ident["etag"] is None and ident["last_modified"]


def test_unanswerable_or_signed_paths_give_nothing(server: str) -> None:
    assert remote_identity(f"/vsicurl/{server}/missing.tif")["bytes"] is None
    assert remote_identity("/vsis3/bucket/key.tif") == {
        "bytes": None,
        "etag": None,
        "last_modified": None,
    }


def test_the_fingerprint_of_a_url_input_carries_it(tmp_path: Path, server: str) -> None:
    from mgpr.conf.schema import PredictConfig
    from mgpr.run.identity import fingerprint

    (tmp_path / "etag.tif").write_bytes(b"x" * 100)

    class Info:
        path = f"/vsicurl/{server}/etag.tif"
        file_bytes = None
        mtime = None
        source_files = ()

    fp = fingerprint(PredictConfig(), "null", "none", [Info()], {Info.path: [1, 2, 3]})
    (entry,) = fp["inputs"]
    assert entry["bytes"] == 100 and entry["etag"] == '"v-100"' and entry["mtime"]
