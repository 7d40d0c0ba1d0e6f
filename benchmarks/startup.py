"""Time from process start to ready and to the first answered request, before and after.

    .venv/bin/python -m benchmarks.startup [--runs 3] [--before f282b71] [--quick]

`unetpp serve` is started as a user would (a subprocess on a free port) on a repository of one
graph (L1 fp32) and of eight (L1..L4 fp32 and int8) of the full-width UNet++ with untrained
weights (benchmarks/common.py `full_width_repository`: latency does not depend on them), and
timed from just before the process starts to /readyz answering 200 and to the answer of the
first /v1/segment (a 256x256 16-bit PNG, sent as soon as it is ready). "before" is the server
of commit `--before` (which calibrated every graph at start-up), installed from a git worktree
with `pip install --target` and run with that folder on PYTHONPATH; it reads schema-1
manifests, so it gets the same graph files under a schema-1 model.json. "after" is this tree.
The runs are interleaved (the order rotating each round); medians are reported, with the load
average before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ROOT, Study, free_port, full_width_repository, load_average, stop

WORK = ROOT / "runs" / "bench-startup"
BEFORE = "f282b71"
ONE = ("L1",)


def subset(source: Path, out: Path, graphs: tuple[str, ...] | None, schema: int) -> Path:
    """A repository of `source`'s graph files (linked) with a manifest that keeps only
    `graphs` (None: all), written in `schema` (1: what the old server reads)."""
    manifest = json.loads((source / "model.json").read_text())
    if graphs is not None:
        manifest["graphs"] = [g for g in manifest["graphs"] if g["name"] in graphs]
    if schema == 1:
        manifest = schema_1(manifest)
    out.mkdir(parents=True, exist_ok=True)
    for g in manifest["graphs"]:
        link = out / g["file"]
        if not link.exists():
            link.symlink_to(source.resolve() / g["file"])
    (out / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def schema_1(manifest: dict[str, Any]) -> dict[str, Any]:
    """A schema-2 binary manifest as schema 1 wrote it: num_classes and threshold, no task,
    no cascade, graphs without object scores."""
    old = {k: v for k, v in manifest.items() if k not in ("task", "cascade")}
    old |= {"schema_version": 1, "num_classes": 1, "threshold": manifest["task"]["threshold"]}
    old["graphs"] = [{k: v for k, v in g.items() if k != "instances"} for g in manifest["graphs"]]
    for g in old["graphs"]:
        if g.get("accuracy"):
            g["accuracy"] = {k: v for k, v in g["accuracy"].items() if k != "classes"}
    return old


def install_before(commit: str) -> Path:
    """The server of `commit`, installed (no dependencies: this venv has them) into a folder
    for PYTHONPATH; made once."""
    tree, site = WORK / f"before-tree-{commit}", WORK / f"before-site-{commit}"
    if not (site / "unetpp").exists():
        if not tree.exists():
            git = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit]
            subprocess.run(git, check=True, capture_output=True)
        pip = [str(ROOT / ".venv" / "bin" / "pip"), "install", "-q", "--no-deps"]
        pip += ["--no-build-isolation", "--target", str(site), str(tree)]
        subprocess.run(pip, check=True, capture_output=True)
    return site


def image_png() -> bytes:
    import numpy as np

    from unetpp.core.datasets import synthetic_image
    from unetpp.core.imageio import encode_png

    image, _ = synthetic_image(np.random.default_rng(0), 256)
    return encode_png(image)


def one_start(
    version: str, models: Path, site: Path | None, image: bytes, log: Path
) -> dict[str, Any]:
    """Start `unetpp serve` (its output in `log`), time ready and the first answer, stop it;
    the log's "loaded" line says when the sessions were open."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = (site / "bin" / "unetpp") if site else (ROOT / ".venv" / "bin" / "unetpp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNETPP_")}
    if site:
        env["PYTHONPATH"] = str(site)
    load = load_average()
    # a neutral working directory: this tree's unetpp/ must not shadow the installed one
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out, tempfile.TemporaryDirectory() as cwd:
        wall, start = time.time(), time.monotonic()
        proc = subprocess.Popen(
            [str(exe), "serve", "--models", str(models), "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=out,
        )
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                listening, ready = _wait_ready(client, proc, start)
                answer = client.post(
                    "/v1/segment", content=image, headers={"content-type": "image/png"}
                )
                first = time.monotonic() - start
                answer.raise_for_status()
        finally:
            stop(proc)
    return {
        "listening_s": round(listening, 3),
        "sessions_s": round(_logged("loaded ", log) - wall, 3),
        "ready_s": round(ready, 3),
        "first_answer_s": round(first, 3),
        "graph": answer.headers.get("x-unetpp-graph"),
        "load_average": load,
    }


def _wait_ready(client: httpx.Client, proc: subprocess.Popen, start: float) -> tuple[float, float]:
    """Seconds from `start` to the first answer of /readyz (listening) and to its first 200."""
    listening = None
    while True:
        try:
            status = client.get("/readyz").status_code
            listening = listening or time.monotonic() - start
            if status == 200:
                return listening, time.monotonic() - start
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} (see its log)")
        if time.monotonic() - start > 600:
            raise SystemExit("not ready after 600 s")
        time.sleep(0.05)


def _logged(text: str, log: Path) -> float:
    """The time (time.time()) of the first line of the server's log that holds `text`."""
    for line in log.read_text().splitlines():
        if text in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return stamp.timestamp()
    raise SystemExit(f"{log}: no line with {text!r}")


def median(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="starts per configuration")
    parser.add_argument("--before", default=BEFORE, help="the commit to compare with")
    parser.add_argument("--quick", action="store_true", help="one start each (a smoke run)")
    args = parser.parse_args(argv)
    study = Study("startup", args.quick)
    runs = 1 if args.quick else args.runs
    eight = full_width_repository(WORK / "eight")
    site = install_before(args.before)
    repositories = {
        (version, count): subset(
            eight,
            WORK / f"{version}-{count}",
            ONE if count == 1 else None,
            1 if version == "before" else 2,
        )
        for version in ("before", "after")
        for count in (1, 8)
    }
    image = image_png()
    results: dict[tuple[str, int], list[dict[str, Any]]] = {key: [] for key in repositories}
    keys = list(repositories)
    for r in range(runs):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            version, count = key
            log = WORK / "logs" / f"{version}-{count}-{r}.log"
            run = one_start(
                version, repositories[key], site if version == "before" else None, image, log
            )
            print(f"{version} {count} graph(s): {run}", flush=True)
            results[key].append(run)
    rows = [
        {
            "version": version,
            "commit": args.before if version == "before" else _head(),
            "graphs": count,
            "listening_s": median(results[(version, count)], "listening_s"),
            "sessions_s": median(results[(version, count)], "sessions_s"),
            "ready_s": median(results[(version, count)], "ready_s"),
            "first_answer_s": median(results[(version, count)], "first_answer_s"),
            "runs": results[(version, count)],
        }
        for version, count in keys
    ]
    study.save(models=str(eight.relative_to(ROOT)), image="256x256 16-bit PNG", rows=rows)


def _head() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip()


if __name__ == "__main__":
    main()
