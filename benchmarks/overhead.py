"""What the HTTP service adds to one request at concurrency 1, before and after (issue 18 item 4).

    .venv/bin/python -m benchmarks.overhead --models DIR [--before 4db9fbb] [--repeats 40]

Two servers run at once on loopback ports, each `unetpp serve` with default settings on the
same repository: the tree at commit `--before` and the tree at `--after` (default HEAD), each
installed from a git worktree with `pip install --target` (benchmarks/startup.py
`install_before`), so uncommitted edits play no part. The image is the server study's: a
256x256 crop of a HeLa test frame, a 16-bit grey PNG; the answer a PNG mask. Requests go one at
a time (a bare HTTP/1.1 client, one keep-alive socket per server), interleaved over servers and targets with
the order rotating each round and a short pause before each; per request, *end to end* is the
client's wall time and *added* is end to end minus the server's own inference time
(X-UNetPP-Inference-Ms): what decoding, preprocessing, routing, queueing, rendering, the
thread hops, the framework and the loopback connection cost. Medians. Measuring starts once
both servers are idle (their background calibration done). A server that sends Server-Timing
also gives its spans (decode, queue, infer, render, total); end to end minus total is what
happens outside the request's handler (HTTP parsing, middleware, the client).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from benchmarks.common import ROOT, Study, free_port, start_process, stop
from benchmarks.server import test_crop
from benchmarks.startup import install_before

BEFORE = "4db9fbb"
SETTLE_S = 0.05
TARGETS: dict[str, dict[str, Any]] = {
    "level=1 fp32": {"params": {"level": 1, "precision": "fp32"}},
    "level=1 fp32, multipart": {"params": {"level": 1, "precision": "fp32"}, "multipart": True},
    "level=4 fp32": {"params": {"level": 4, "precision": "fp32"}},
}


def commit(ref: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@contextmanager
def serving(site: Path, models: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`unetpp serve` of the tree installed in `site`, on a free port, ready; stopped on exit."""
    url = f"http://127.0.0.1:{free_port()}"
    argv = [str(site / "bin" / "unetpp"), "serve", "--models", str(models)]
    proc = start_process(
        [*argv, "--port", url.rsplit(":", 1)[1]], f"{url}/readyz", env={"PYTHONPATH": str(site)}
    )
    try:
        yield url, proc
    finally:
        stop(proc)


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pids: list[int], share: float = 0.05, timeout_s: float = 300) -> None:
    """Until every process used under `share` of a core over two consecutive seconds (their
    background calibration at the tile size is done)."""
    quiet, deadline = 0, time.monotonic() + timeout_s
    while quiet < 2 and time.monotonic() < deadline:
        before = [cpu_s(pid) for pid in pids]
        time.sleep(1.0)
        busy = max(cpu_s(pid) - b for pid, b in zip(pids, before, strict=True))
        quiet = quiet + 1 if busy < share else 0


def server_timing(header: str) -> dict[str, float]:
    """`decode;dur=1.2, infer;dur=30.1` -> {"decode": 1.2, "infer": 30.1}."""
    spans = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";dur=")
        if rest:
            spans[name] = float(rest)
    return spans


class Connection:
    """A bare HTTP/1.1 client on one keep-alive socket: it adds microseconds to a request
    (httpx adds about a millisecond of its own, which is not the service's)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.netloc
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=300)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, target: str, body: bytes, content_type: str) -> tuple[int, dict[str, str]]:
        """The status and headers (lower-case names); the body is read and dropped."""
        head = (
            f"POST {target} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body)
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._recv()
        head_bytes, rest = received.split(b"\r\n\r\n", 1)
        status, *lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        length = int(headers["content-length"])
        while len(rest) < length:
            rest += self._recv()
        return int(status.split()[1]), headers

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


BOUNDARY = "unetpp-overhead"


def multipart(png: bytes) -> bytes:
    """`png` as the multipart field `image`."""
    part = (
        f'--{BOUNDARY}\r\ncontent-disposition: form-data; name="image"; filename="image.png"'
        "\r\ncontent-type: image/png\r\n\r\n"
    )
    return part.encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(connection: Connection, png: bytes, target: dict[str, Any]) -> dict[str, Any]:
    """One request; the client's wall time, the server's inference time and its spans."""
    if target.get("multipart"):
        body, content_type = multipart(png), f"multipart/form-data; boundary={BOUNDARY}"
    else:
        body, content_type = png, "image/png"
    start = time.perf_counter()
    status, headers = connection.post(
        f"/v1/segment?{urlencode(target['params'])}", body, content_type
    )
    e2e = 1000.0 * (time.perf_counter() - start)
    if status != 200:
        raise RuntimeError(f"the server answered {status}")
    inference = float(headers["x-unetpp-inference-ms"])
    return {
        "e2e_ms": e2e,
        "inference_ms": inference,
        "added_ms": e2e - inference,
        "graph": headers["x-unetpp-graph"],
        "spans": server_timing(headers.get("server-timing", "")),
    }


def measure(
    urls: dict[str, str], png: bytes, repeats: int, warmup: int
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every (version, target) `repeats` times, interleaved, the order rotating each round."""
    cells = [(version, target) for target in TARGETS for version in urls]
    clients = {v: Connection(url) for v, url in urls.items()}
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {cell: [] for cell in cells}
    try:
        for _ in range(warmup):
            for version, target in cells:
                post(clients[version], png, TARGETS[target])
        for r in range(repeats):
            k = r % len(cells)
            for version, target in cells[k:] + cells[:k]:
                time.sleep(SETTLE_S)
                sample = post(clients[version], png, TARGETS[target])
                samples[version, target].append({**sample, "load_1min": os.getloadavg()[0]})
    finally:
        for client in clients.values():
            client.close()
    return samples


def summary(version: str, ref: str, target: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    added = [s["added_ms"] for s in runs]
    row: dict[str, Any] = {
        "target": target,
        "version": version,
        "commit": ref,
        "graph": runs[0]["graph"],
        "requests": len(runs),
        "e2e_ms": med([s["e2e_ms"] for s in runs]),
        "inference_ms": med([s["inference_ms"] for s in runs]),
        "added_ms": med(added),
        "added_min_ms": round(min(added), 3),  # the least contended request
        "added_p10_ms": round(statistics.quantiles(added, n=10)[0], 3),
        "added_p90_ms": round(statistics.quantiles(added, n=10)[-1], 3),
        "added_each_ms": [round(a, 2) for a in added],
        "load_1min": [min(s["load_1min"] for s in runs), max(s["load_1min"] for s in runs)],
    }
    if all(s["spans"] for s in runs):
        names = list(runs[0]["spans"])
        row["spans_ms"] = {n: med([s["spans"][n] for s in runs]) for n in names}
        # routing and the hops to the batcher's thread and back: total less the named steps
        row["rest_of_total_ms"] = med([rest_of_total(s["spans"]) for s in runs])
        row["outside_handler_ms"] = med([s["e2e_ms"] - s["spans"]["total"] for s in runs])
    return row


def rest_of_total(spans: dict[str, float]) -> float:
    return spans["total"] - sum(ms for name, ms in spans.items() if name != "total")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="a model repository")
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with")
    parser.add_argument("--after", default="HEAD", help="the commit measured against it")
    parser.add_argument("--repeats", type=int, default=40, help="requests per server and target")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness of this client and both servers (negative, as root: ahead of the other "
        "work on a shared machine, closer to an idle one)",
    )
    parser.add_argument("--note", default="", help="a remark for the report (the conditions)")
    parser.add_argument("--quick", action="store_true", help="5 requests each (a smoke run)")
    args = parser.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # the servers, started below, inherit it
    study = Study("overhead", args.quick)
    refs = {"before": commit(args.before), "after": commit(args.after)}
    sites = {version: install_before(ref) for version, ref in refs.items()}
    png = _image()
    models = args.models.resolve()
    with (
        serving(sites["before"], models) as (before, p1),
        serving(sites["after"], models) as (after, p2),
    ):
        wait_idle([p1.pid, p2.pid])
        repeats = 5 if args.quick else args.repeats
        samples = measure({"before": before, "after": after}, png, repeats, warmup=3)
    rows = [
        summary(version, refs[version], target, runs) for (version, target), runs in samples.items()
    ]
    for row in rows:
        print(row, flush=True)
    study.save(
        models=str(models.relative_to(ROOT)) if models.is_relative_to(ROOT) else str(models),
        image=f"256x256 crop of HeLa test frame 17 (16-bit grey PNG, {len(png):,} bytes)",
        settle_s=SETTLE_S,
        nice=args.nice,
        note=args.note,
        rows=rows,
    )


def _image() -> bytes:
    from unetpp.core.imageio import encode_png

    return encode_png(test_crop(256))


if __name__ == "__main__":
    main()
