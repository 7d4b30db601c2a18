import http.server
import json
import os
import shutil
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from modelserve_edge.avro_store import (
    DirectoryTarget,
    HttpTarget,
    RotatingAvroWriter,
    Uploader,
    complete_length,
    read_records,
    recover_part,
    to_record,
)
from modelserve_edge.avro_writer import INPUT, AvroSink


def rec(i: int, device: str = "engine-01") -> dict:
    msg = {
        "deviceId": device,
        "engine": 1,
        "unit": 1,
        "cycle": i,
        "timestamp": 1_700_000_000_000 + i,
        "settings": [0.001, 0.0, 100.0],
        "sensors": [float(i)] * 21,
        "RUL": 200.0 - i,
        "modelVersion": "1.0.0",
    }
    return to_record(msg, now_ms=1_800_000_000_000 + i)


def all_records(directory):
    return [r for p in sorted(directory.glob("*.avro")) for r in read_records(p)]


class Clock:
    def __init__(self):
        self.now = 1_750_000_000.0

    def __call__(self):
        return self.now


def test_close_renames_part_to_avro_with_every_record(tmp_path):
    w = RotatingAvroWriter(tmp_path)
    w.write([rec(1), rec(2)])
    w.write([rec(3)])
    assert [p.suffix for p in tmp_path.iterdir()] == [".part"]
    w.close()
    assert list(tmp_path.glob("*.part")) == []
    assert [r["cycle"] for r in all_records(tmp_path)] == [1, 2, 3]
    assert all_records(tmp_path)[0] == rec(1)


def test_rotation_by_size_keeps_order_and_every_record(tmp_path):
    w = RotatingAvroWriter(tmp_path, max_bytes=2000, codec="null")
    for i in range(60):
        w.write([rec(i)])
    w.close()
    files = sorted(tmp_path.glob("*.avro"))
    assert len(files) > 3
    assert all(f.stat().st_size < 2000 + 1000 for f in files)
    assert [r["cycle"] for r in all_records(tmp_path)] == list(range(60))


def test_rotation_by_age(tmp_path):
    clock = Clock()
    w = RotatingAvroWriter(tmp_path, max_age=60, clock=clock)
    w.write([rec(1)])
    clock.now += 59
    assert not w.maybe_rotate()
    w.write([rec(2)])
    clock.now += 1.5
    assert w.maybe_rotate()
    assert w.current is None and len(list(tmp_path.glob("*.avro"))) == 1
    assert not w.maybe_rotate()  # nothing open: no empty file
    w.write([rec(3)])
    w.close()
    assert [r["cycle"] for r in all_records(tmp_path)] == [1, 2, 3]


def crash(writer: RotatingAvroWriter):
    """Abandon a writer as a killed process would: the file stays .part, nothing more is written."""
    writer._file.close()


def test_leftover_part_is_recovered_on_start_without_losing_records(tmp_path):
    w = RotatingAvroWriter(tmp_path)
    for i in range(5):
        w.write([rec(i)])
    part = w.current
    crash(w)
    with open(part, "ab") as f:  # a torn block: the crash happened mid-write
        f.write(b"\x0a\x80\x01garbage-without-sync-marker")
    w2 = RotatingAvroWriter(tmp_path)
    assert list(tmp_path.glob("*.part")) == []
    assert len(w2.recovered) == 1
    assert [r["cycle"] for r in all_records(tmp_path)] == list(range(5))
    w2.write([rec(5)])
    w2.close()
    assert sorted(r["cycle"] for r in all_records(tmp_path)) == list(range(6))


def test_part_without_a_complete_block_is_removed(tmp_path):
    w = RotatingAvroWriter(tmp_path)
    w.write([rec(1)])
    part = w.current
    crash(w)
    header_only = part.read_bytes()[: complete_length(part)[0] - 10]
    part.write_bytes(header_only)
    assert recover_part(part) is None
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def five_block_part(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    w = RotatingAvroWriter(d)
    block_ends = []
    for i in range(5):
        w.write([rec(2 * i), rec(2 * i + 1)])
        block_ends.append(w.current.stat().st_size)
    data = w.current.read_bytes()
    crash(w)
    return data, block_ends


@settings(max_examples=60, deadline=None)
@given(permille=st.integers(min_value=0, max_value=1000))
def test_recovery_of_a_part_cut_anywhere_keeps_exactly_the_complete_blocks(
    five_block_part, tmp_path_factory, permille
):
    data, block_ends = five_block_part
    cut = len(data) * permille // 1000
    d = tmp_path_factory.mktemp("cut")
    part = d / "rul-x.avro.part"
    part.write_bytes(data[:cut])
    final = recover_part(part)
    complete = sum(1 for end in block_ends if end <= cut)
    assert not part.exists()
    if complete == 0:
        assert final is None
    else:
        assert [r["cycle"] for r in read_records(final)] == list(range(2 * complete))
    shutil.rmtree(d)


def test_to_record_rejects_messages_that_do_not_fit():
    good = {"deviceId": "e", "cycle": 1, "settings": [0.0] * 3, "sensors": [0.0] * 21, "RUL": 3}
    assert to_record(good, 1)["engine"] is None
    for bad in (
        {**good, "RUL": None},
        {**good, "cycle": "one"},
        {k: v for k, v in good.items() if k != "deviceId"},
    ):
        with pytest.raises(ValueError):
            to_record(bad, 1)


class FlakyTarget:
    def __init__(self, failures: int):
        self.failures = failures
        self.shipped = []

    def ship(self, path):
        if self.failures:
            self.failures -= 1
            raise OSError("endpoint down")
        self.shipped.append((path.name, path.read_bytes()))


def test_uploader_ships_closed_files_only_and_deletes_after_success(tmp_path):
    w = RotatingAvroWriter(tmp_path / "avro", max_bytes=1500, codec="null")
    for i in range(20):
        w.write([rec(i)])
    closed = sorted((tmp_path / "avro").glob("*.avro"))
    assert closed and w.current is not None  # one file still open (.part)
    contents = {p.name: p.read_bytes() for p in closed}
    target = FlakyTarget(failures=1)
    up = Uploader(tmp_path / "avro", target)
    assert up.upload_once() == 0  # endpoint down: nothing deleted
    assert sorted((tmp_path / "avro").glob("*.avro")) == closed
    assert up.upload_once() == len(closed)
    assert dict(target.shipped) == contents
    assert list((tmp_path / "avro").glob("*.avro")) == []
    assert w.current.exists()  # the open part was neither shipped nor touched
    w.close()
    assert up.upload_once() == 1
    assert not any(name.endswith(".part") for name, _ in target.shipped)


def test_directory_target_receives_readable_files(tmp_path):
    w = RotatingAvroWriter(tmp_path / "avro")
    w.write([rec(1), rec(2)])
    w.close()
    assert Uploader(tmp_path / "avro", DirectoryTarget(tmp_path / "out")).upload_once() == 1
    (shipped,) = (tmp_path / "out").iterdir()
    assert [r["cycle"] for r in read_records(shipped)] == [1, 2]


class UploadHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        if server.fail_next:
            server.fail_next -= 1
            self.send_response(503)
        else:
            server.received.append((self.headers["X-Filename"], body))
            self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_target_keeps_the_file_until_the_endpoint_accepts_it(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), UploadHandler)
    server.fail_next, server.received = 1, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        w = RotatingAvroWriter(tmp_path)
        w.write([rec(7)])
        path = w.close_current()
        up = Uploader(tmp_path, HttpTarget(f"http://127.0.0.1:{server.server_port}/avro"))
        assert up.upload_once() == 0 and path.exists()  # 503
        data = path.read_bytes()
        assert up.upload_once() == 1 and not path.exists()
        assert server.received == [(path.name, data)]
    finally:
        server.shutdown()


def test_sink_stores_good_messages_and_drops_the_rest(tmp_path):
    good = {"deviceId": "e", "cycle": 1, "settings": [0.0] * 3, "sensors": [0.0] * 21, "RUL": 3}
    writer = RotatingAvroWriter(tmp_path)
    sink = AvroSink(writer)
    sink.handle(INPUT, json.dumps(good).encode())
    sink.handle(INPUT, b"[1, 2]")  # JSON, not an object
    sink.handle(INPUT, b"{")  # not JSON
    sink.handle("otherInput", json.dumps({**good, "cycle": 2}).encode())  # not our input
    writer.close()
    files = sorted(tmp_path.glob("*.avro"))
    assert [r["cycle"] for f in files for r in read_records(f)] == [1]


def store_bytes(directory):
    return sum(p.stat().st_size for p in directory.glob("*.avro*"))


def test_store_byte_cap_drops_the_oldest_files_and_counts_them(tmp_path):
    w = RotatingAvroWriter(tmp_path, max_bytes=2000, codec="null", store_max_bytes=6000)
    for i in range(300):
        w.write([rec(i)])
        assert store_bytes(tmp_path) <= 6000 + 2000  # the cap, plus the record that closes a file
    w.close()
    assert store_bytes(tmp_path) <= 6000
    kept = [r["cycle"] for r in all_records(tmp_path)]
    assert kept == list(range(300 - len(kept), 300))  # the newest, contiguous: oldest went first
    dropped = w.dropped.values
    assert dropped["records"] == 300 - len(kept) > 0
    assert dropped["files_max_bytes"] > 0 and dropped["files_max_age"] == 0
    assert dropped["bytes"] + store_bytes(tmp_path) > 6000
    again = RotatingAvroWriter(tmp_path, max_bytes=2000, store_max_bytes=6000)  # counters persist
    assert again.dropped.values == dropped


def test_store_retention_drops_files_past_it_but_not_the_open_one(tmp_path):
    clock = Clock()
    clock.now = time.time()
    w = RotatingAvroWriter(tmp_path, max_bytes=1 << 20, clock=clock, retention=3600)
    w.write([rec(1)])
    old = w.close_current()
    w.write([rec(2)])
    newer = w.close_current()
    w.write([rec(3)])  # open
    os.utime(old, (clock.now - 7200, clock.now - 7200))
    os.utime(newer, (clock.now - 1800, clock.now - 1800))
    assert w.prune() == 1
    assert not old.exists() and newer.exists()
    clock.now += 1900  # newer is now past the retention too
    assert w.prune() == 1
    w.close()
    assert [r["cycle"] for r in all_records(tmp_path)] == [3]
    assert w.dropped.values == {"files_max_age": 2, "files_max_bytes": 0, "records": 2,
                                "bytes": w.dropped.values["bytes"]}  # fmt: skip
    assert w.dropped.values["bytes"] > 0


def test_store_cap_below_the_file_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="store cap"):
        RotatingAvroWriter(tmp_path, max_bytes=2000, store_max_bytes=1000)


def test_uploader_skips_a_file_the_store_dropped_meanwhile(tmp_path):
    class Vanishing:
        def ship(self, path):
            path.unlink()  # the pruner wins the race
            raise FileNotFoundError(path)

    src = tmp_path / "src"
    w = RotatingAvroWriter(src)
    w.write([rec(1)])
    w.close()
    up = Uploader(src, Vanishing())
    assert up.upload_once() == 0 and up.failures == 0
