"""Attacks (benchmark, not CI): issue 20's attacks on a real server process, one after another,
each for --seconds; for each, the server's peak resident memory (VmHWM, reset before the attack),
`/healthz` p99 and a normal 256x256 request's p99 while it runs, and the resident memory after.

    .venv/bin/python -m benchmarks.attacks --models DIR --label after
    git worktree add /tmp/before f282b71
    .venv/bin/python -m benchmarks.attacks --models DIR --tree /tmp/before --label before

--tree is a checkout whose server is started (`python -m unetpp.server` with the checkout first
on the path; the checkout's `unetpp/` must reach its packages, see `tree_path`). Results merge
into results/attacks.json under --label, so "before" and "after" sit side by side. A watchdog
kills the server when its resident memory passes --rss-ceiling-gb (the machine is shared), and
the next attack starts a fresh one. The server's open-file limit is --open-files for both trees,
so --sockets idle connections are more than it can hold (the issue's 20,000 against 20,000).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import ROOT, Study, command_line, free_port, load_average, place, shown
from benchmarks.soak import _image
from unetpp.core.imageio import encode_png

PROBE_TIMEOUT_S = 5.0
V2_LENGTH = "Inference-Header-Content-Length"


def tree_path(tree: Path) -> None:
    """Make `tree/unetpp` a whole package (links to the tree's core, model, export, server), as
    the editable install maps them, so that `python -m unetpp.server` run in `tree` uses it.
    This checkout needs none: its editable install maps them already."""
    if tree.resolve() == ROOT.resolve():
        return
    for name in ("core", "model", "export", "server"):
        link = tree / "unetpp" / name
        if not link.exists():
            link.symlink_to(Path("..") / name)


@dataclass
class Server:
    """A `python -m unetpp.server` process of one tree, its log, and a memory watchdog."""

    tree: Path
    models: Path
    env: dict[str, str]
    open_files: int
    ceiling_mb: float
    log: Path
    proc: subprocess.Popen | None = None
    url: str = ""
    killed_at_mb: float | None = None

    def start(self) -> None:
        port = free_port()
        self.url, self.killed_at_mb = f"http://127.0.0.1:{port}", None
        limit = (self.open_files, self.open_files)
        argv = [sys.executable, "-m", "unetpp.server", "--models", str(self.models)]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [*argv, "--port", str(port)],
                cwd=self.tree,
                env={**os.environ, "PYTHONPATH": str(self.tree), **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit),
            )
        deadline = time.monotonic() + 900
        while (state := self.state()) != "ready":
            assert self.proc.poll() is None, f"the server exited; see {self.log}"
            assert state != "failed", f"the model did not load; see {self.log}"
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)
        threading.Thread(target=self._watch, args=(self.proc,), daemon=True).start()

    def state(self) -> str:
        """The model's state as /healthz says it: loading, ready, failed ("" before HTTP)."""
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/healthz", timeout=5).json()["model"]
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(30)

    def _watch(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            rss = self.status("VmRSS")
            if rss > self.ceiling_mb:
                self.killed_at_mb = rss
                proc.kill()
                proc.wait()
            time.sleep(0.05)

    def status(self, key: str) -> float:
        """A /proc/PID/status field in MB (0 once the process is gone)."""
        with contextlib.suppress(OSError, AttributeError):
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024
        return 0.0

    def quiet(self, timeout_s: float = 180.0) -> float:
        """Wait until no request is in flight (the last attack's work is done); seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s and self.alive():
            with contextlib.suppress(httpx.HTTPError):
                text = httpx.get(f"{self.url}/metrics", timeout=PROBE_TIMEOUT_S).text
                busy = re.findall(r"^unetpp_requests_in_flight(?:\{[^}]*\})? (\S+)$", text, re.M)
                if not any(float(v) for v in busy):
                    break
            time.sleep(1.0)
        return time.monotonic() - start

    def dropped(self) -> Counter:
        """unetpp_connections_dropped_total by reason (empty on a server without the cap)."""
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"{self.url}/metrics", timeout=PROBE_TIMEOUT_S).text
            found = re.findall(
                r'^unetpp_connections_dropped_total\{reason="(\w+)"\} (\S+)$', text, re.M
            )
            return Counter({reason: float(v) for reason, v in found})
        return Counter()

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", int(self.url.rsplit(":", 1)[1])


@dataclass
class Probe:
    """A closed loop of one request while an attack runs: milliseconds of every answer, and the
    statuses (0: no answer within PROBE_TIMEOUT_S or a dropped connection)."""

    send: Callable[[], int]
    ms: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                status = self.send()
            except httpx.HTTPError:
                status = 0
            self.ms.append(1000.0 * (time.perf_counter() - start))
            self.statuses[status] += 1
            self.stop.wait(0.1)

    def summary(self, ok: int = 200) -> dict[str, Any]:
        ms = sorted(self.ms) or [float("nan")]
        return {
            "p50_ms": round(ms[len(ms) // 2], 1),
            "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
            "answered": self.statuses[ok],
            "sent": sum(self.statuses.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
        }


@contextlib.contextmanager
def probes(server: Server, png: bytes) -> Iterator[tuple[Probe, Probe]]:
    def health() -> int:
        return httpx.get(f"{server.url}/healthz", timeout=PROBE_TIMEOUT_S).status_code

    def normal() -> int:
        url = f"{server.url}/v1/segment"
        headers = {"content-type": "image/png"}
        return httpx.post(url, content=png, headers=headers, timeout=PROBE_TIMEOUT_S).status_code

    pair = (Probe(health), Probe(normal))
    threads = [threading.Thread(target=p.run, daemon=True) for p in pair]
    for t in threads:
        t.start()
    try:
        yield pair
    finally:
        for p in pair:
            p.stop.set()
        for t in threads:
            t.join(PROBE_TIMEOUT_S + 5)


# --------------------------------------------------------------------------- the attacks
# Each runs until `end` (time.monotonic()) and returns what it saw.


def idle_sockets(server: Server, end: float, count: int) -> dict[str, Any]:
    """`count` connections that send nothing; one the server closes is opened again."""
    selector, opened, failed = selectors.DefaultSelector(), 0, 0
    while time.monotonic() < end:
        while len(selector.get_map()) < count and time.monotonic() < end:
            try:
                s = socket.create_connection(server.address, timeout=2)
            except OSError:
                failed += 1
                break
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
            opened += 1
        for key, _ in selector.select(timeout=0.2):
            selector.unregister(key.fileobj)
            key.fileobj.close()
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    return {"connections_opened": opened, "connects_failed": failed}


def slow_uploads(server: Server, end: float, count: int) -> dict[str, Any]:
    """`count` uploads of a 1 MB body at one byte a second each; a cut one starts again."""
    head = (
        b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    answers: Counter = Counter()

    def upload() -> socket.socket:
        s = socket.create_connection(server.address, timeout=5)
        s.sendall(head)
        s.setblocking(False)
        return s

    sockets = [upload() for _ in range(count)]
    while time.monotonic() < end:
        for i, s in enumerate(sockets):
            try:
                s.send(b"\x89")
                answer = s.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                answer = b""
            answers[answer[9:12].decode(errors="replace") or "closed"] += 1
            s.close()
            with contextlib.suppress(OSError):
                sockets[i] = upload()
        time.sleep(1.0)
    for s in sockets:
        s.close()
    return {"answers": dict(answers)}


def random_paths(server: Server, end: float, threads: int = 4) -> dict[str, Any]:
    """GETs of random model names with a trailing slash: before the fix, the redirect to the
    route `/v2/models/{model_name}` recorded each raw path as a new metric label."""
    sent = Counter()

    def loop() -> None:
        with httpx.Client(base_url=server.url, timeout=PROBE_TIMEOUT_S) as client:
            while time.monotonic() < end:
                with contextlib.suppress(httpx.HTTPError):
                    sent[client.get(f"/v2/models/{uuid.uuid4().hex}/").status_code] += 1

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    start = time.perf_counter()
    scrape = httpx.get(f"{server.url}/metrics", timeout=60)
    return {
        "requests": dict(sent),
        "metrics_bytes": len(scrape.content),
        "scrape_ms": round(1000 * (time.perf_counter() - start), 1),
    }


def v2_request(pixels: np.ndarray, outputs: list[dict]) -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": list(pixels.shape),
                "parameters": {"binary_data_size": pixels.size},
            }
        ],
        "outputs": outputs,
    }
    head = json.dumps(header).encode()
    return head + pixels.tobytes(), {V2_LENGTH: str(len(head))}


def v2_url(server: Server, version: str = "") -> str:
    name = json.loads((server.models / "model.json").read_text())["name"]
    return f"{server.url}/v2/models/{name}{f'/versions/{version}' if version else ''}/infer"


def v2_outputs_x3000(server: Server, end: float) -> dict[str, Any]:
    """One 256x256 /v2 request asking for `probabilities` 3,000 times, as JSON."""
    body, headers = v2_request(
        np.zeros((1, 1, 256, 256), np.uint8), [{"name": "probabilities"}] * 3000
    )
    try:
        r = httpx.post(v2_url(server), content=body, headers=headers, timeout=120)
        outcome = {"status": r.status_code, "response_bytes": len(r.content)}
    except httpx.HTTPError as exc:
        outcome = {"status": 0, "error": type(exc).__name__}
    time.sleep(max(0.0, end - time.monotonic()))
    return {"request_bytes": len(body), **outcome}


def v2_malformed(server: Server, end: float) -> dict[str, Any]:
    """JSON nested 5,000 deep, a 5,001-digit number, a non-ASCII digit as the header length."""
    good = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [8, 8]}]})
    cases = {
        "nested 5,000 deep": (b"[" * 5000 + b"]" * 5000, {}),
        "5,001-digit number": (b'{"inputs": [' + b"9" * 5001 + b"]}", {}),
        "header length '\u00b2'": (good.encode(), {V2_LENGTH: b"\xb2"}),
    }
    statuses = {}
    while time.monotonic() < end:
        for name, (body, headers) in cases.items():
            r = httpx.post(v2_url(server), content=body, headers=headers, timeout=30)
            statuses[name] = r.status_code
        time.sleep(0.5)
    return {"statuses": statuses}


def unread_answers(server: Server, end: float, count: int = 8) -> dict[str, Any]:
    """`count` /v2 requests for 1024x1024 logits as JSON (about 20 MB each), never read."""
    body, headers = v2_request(np.zeros((1, 1, 1024, 1024), np.uint8), [{"name": "logits"}])
    url = httpx.URL(v2_url(server))
    lines = [f"POST {url.raw_path.decode()} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(lines + [f"{k}: {v}" for k, v in headers.items()]) + "\r\n\r\n").encode()
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(server.address)
        s.sendall(request + body)
        sockets.append(s)
    time.sleep(max(0.0, end - time.monotonic()))
    for s in sockets:
        s.close()
    return {"connections": count}


def disconnects(server: Server, end: float) -> dict[str, Any]:
    """Uploads that stop halfway and close, ten a second."""
    sent = 0
    while time.monotonic() < end:
        with socket.create_connection(server.address, timeout=5) as s:
            s.sendall(
                b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 250
            )
            sent += 1
        time.sleep(0.1)
    return {"disconnects": sent}


def png_1024_x8(server: Server, end: float) -> dict[str, Any]:
    """Eight clients sending 1024x1024 PNGs to L4 back to back."""
    png = encode_png(_image(1024, 1024, 7))
    statuses: Counter = Counter()

    def loop() -> None:
        while time.monotonic() < end:
            try:
                r = httpx.post(
                    f"{server.url}/v1/segment",
                    content=png,
                    params={"level": 4},
                    headers={"content-type": "image/png"},
                    timeout=120,
                )
                statuses[r.status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1

    workers = [threading.Thread(target=loop) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"png_bytes": len(png), "statuses": dict(statuses)}


def v2_3x1024(server: Server, end: float) -> dict[str, Any]:
    """/v2 infers of a [3, 1, 1024, 1024] batch on L4, the mask as binary, back to back."""
    pixels = (_image(1024, 1024, 8) >> 8).astype(np.uint8)
    body, headers = v2_request(
        np.stack([pixels] * 3)[:, None], [{"name": "mask", "parameters": {"binary_data": True}}]
    )
    statuses: Counter = Counter()
    while time.monotonic() < end:
        try:
            r = httpx.post(v2_url(server, "L4"), content=body, headers=headers, timeout=120)
            statuses[r.status_code] += 1
        except httpx.HTTPError:
            statuses[0] += 1
    return {"statuses": dict(statuses)}


def reloads_x4(server: Server, end: float) -> dict[str, Any]:
    """Four reloads in a row; the resident memory after each."""
    rss, statuses = [], []
    for _ in range(4):
        try:
            r = httpx.post(f"{server.url}/v1/admin/reload", timeout=600)
            statuses.append(r.status_code)
        except httpx.HTTPError:
            statuses.append(0)
        rss.append(round(server.status("VmRSS")))
    time.sleep(max(0.0, end - time.monotonic()))
    return {"statuses": statuses, "rss_mb_after_each": rss}


ATTACKS: dict[str, Callable[..., dict[str, Any]]] = {
    "idle sockets": idle_sockets,
    "slow uploads": slow_uploads,
    "random paths": random_paths,
    "disconnects mid-upload": disconnects,
    "/v2 malformed": v2_malformed,
    "answers never read": unread_answers,
    "/v2 outputs x3000": v2_outputs_x3000,
    "8 x 1024x1024 PNG on L4": png_1024_x8,
    "/v2 [3,1,1024,1024] on L4": v2_3x1024,
    "four reloads": reloads_x4,
}


def attack(server: Server, name: str, seconds: float, png: bytes, **kwargs) -> dict[str, Any]:
    if server.killed_at_mb is not None or not server.alive():
        server.stop()
        server.start()
    waited = server.quiet()
    time.sleep(2.0)
    before_mb, log_bytes = server.status("VmRSS"), server.log.stat().st_size
    server.reset_peak()
    dropped = server.dropped()
    peak = [before_mb]

    def sample() -> None:  # VmHWM dies with a killed process: keep the last reading too
        while not done.is_set():
            peak.append(max(server.status("VmHWM"), server.killed_at_mb or 0.0))
            done.wait(0.1)

    done = threading.Event()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with probes(server, png) as (health, normal):
        seen = ATTACKS[name](server, time.monotonic() + seconds, **kwargs)
    time.sleep(3.0)  # what stays once the attack stopped
    done.set()
    sampler.join()
    row = {
        "attack": name,
        "seconds": seconds,
        "settings": server.env,
        "waited_for_quiet_s": round(waited, 1),
        "rss_before_mb": round(before_mb),
        "peak_rss_mb": round(max(peak)),
        "rss_after_mb": round(server.status("VmRSS")) if server.alive() else None,
        "killed_at_mb": round(server.killed_at_mb) if server.killed_at_mb else None,
        "exited": not server.alive(),
        "log_bytes": server.log.stat().st_size - log_bytes,
        "healthz": health.summary(),
        "normal_256": normal.summary(),
        "attack_saw": seen,
        "connections_dropped": dict(server.dropped() - dropped) if server.alive() else None,
        "load_average": load_average(),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="a model repository")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose server runs")
    parser.add_argument("--label", required=True, help="e.g. before / after")
    parser.add_argument("--seconds", type=float, default=15.0, help="each attack's length")
    parser.add_argument("--sockets", type=int, default=6000, help="idle connections")
    parser.add_argument("--open-files", type=int, default=4096, help="the server's RLIMIT_NOFILE")
    parser.add_argument("--rss-ceiling-gb", type=float, default=6.0, help="the watchdog's limit")
    parser.add_argument(
        "--only",
        nargs="*",
        choices=list(ATTACKS),
        default=list(ATTACKS),
        help="a subset of attacks (their rows replace those of the same label)",
    )
    parser.add_argument(
        "--env", nargs="*", default=[], metavar="NAME=VALUE", help="server settings (UNETPP_*)"
    )
    parser.add_argument("--quick", action="store_true", help="runs/bench-quick, 5 s attacks")
    args = parser.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    tree = args.tree.resolve()
    tree_path(tree)
    env = dict(item.split("=", 1) for item in args.env)
    logs = ROOT / "runs" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    server = Server(
        tree,
        args.models.resolve(),
        env,
        args.open_files,
        args.rss_ceiling_gb * 1024,
        logs / f"attacks-{args.label}.log",
    )
    study = Study("attacks", args.quick)
    png = encode_png(_image(256, 256, 5))
    commit = subprocess.run(
        ["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    kwargs = {"idle sockets": {"count": args.sockets}, "slow uploads": {"count": 64}}
    try:
        server.start()
        with probes(server, png) as (health, normal):
            time.sleep(seconds)
        idle = {"healthz": health.summary(), "normal_256": normal.summary()}
        idle["rss_mb"] = round(server.status("VmRSS"))
        rows = [attack(server, name, seconds, png, **kwargs.get(name, {})) for name in args.only]
    finally:
        server.stop()
    path = place(args.quick).results / "attacks.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    previous = runs.get(args.label, {})
    kept = [r for r in previous.get("rows", []) if r["attack"] not in args.only]
    runs[args.label] = {
        "commands": list(dict.fromkeys([*previous.get("commands", []), command_line("attacks")])),
        "tree": shown(tree),
        "commit": commit,
        "settings": env,
        "open_files": args.open_files,
        "rss_ceiling_gb": args.rss_ceiling_gb,
        "models": shown(args.models.resolve()),
        "idle": idle,
        "rows": sorted(kept + rows, key=lambda r: list(ATTACKS).index(r["attack"])),
    }
    study.save(runs=runs)


if __name__ == "__main__":
    main()
