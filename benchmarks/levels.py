"""Study 3 (levels): latency and throughput of every exported graph at 256x256 and 512x512,
batch 1 and 8, fp32 and int8, against PyTorch eager running the full network, and the
achieved GFLOP/s against this machine's measured matrix-multiply peak.

    .venv/bin/python -m benchmarks.levels                 # the paper study's UNet++ w/ DS
    .venv/bin/python -m benchmarks.levels --models DIR [--checkpoint CKPT]
    .venv/bin/python -m benchmarks.levels --quick         # 256 only, 2 repeats

For each (size, batch): every graph of the repository (onnxruntime, default threads, no memory
arena, so that nine sessions fit in memory; the deepest graphs also with the arena, the server's
default, in sessions held for one size and batch only, up to batch 8 of 256x256) and
`model(x)` of the checkpoint's full network in PyTorch eager (eval, no_grad, default threads:
what a user runs by hand) are timed interleaved, with a 50 ms pause before each run so that one
runtime's spinning threads do not slow the other; median of the repeats. GFLOPs count a
multiply-add as two (the manifest's figure at 256x256, scaled by the pixel count; convolutions
dominate, so the scaling is exact up to the few bilinear/elementwise ops). The peak: float32
matrix multiply of N x N matrices, numpy (its BLAS) and an onnxruntime MatMul graph, median.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    Study,
    add_repository_arguments,
    interleaved_ms,
    pyplot,
    repository,
    save_figure,
    shown,
    summary_ms,
)

SETTLE_S = 0.05
ARENA_PIXELS = 600_000  # images x pixels up to which the arena rows are measured
EAGER = "PyTorch eager (full network)"


def matmul_peak(n: int, repeats: int) -> dict[str, Any]:
    """GFLOP/s of an n x n float32 matrix multiply: numpy and onnxruntime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    times = interleaved_ms(
        {"numpy": lambda: a @ b, "onnxruntime": lambda: session.run(None, {"a": a, "b": b})},
        repeats,
        warmup=2,
        settle_s=SETTLE_S,
    )
    flops = 2 * n**3
    return {
        "n": n,
        **{
            k: {"ms": summary_ms(t), "gflops_per_s": round(flops / np.median(t) / 1e6, 1)}
            for k, t in times.items()
        },
    }


def measure(
    repo: Path, checkpoint: Path, sizes: list[int], batches: list[int], repeats: int
) -> list[dict[str, Any]]:
    import torch

    from unetpp.core.inference import create_session, run_batch
    from unetpp.core.manifest import load_repository
    from unetpp.model.checkpoint import load_checkpoint

    manifest = load_repository(repo)
    graphs = [g for g in manifest.graphs if g.output == "logits"]
    # no memory arena: each would keep the memory of its largest run (batch 8 of 512x512)
    sessions = {g.name: create_session(repo / g.file, memory_arena=False) for g in graphs}
    model = load_checkpoint(checkpoint).build().eval()
    full = max(g.gflops for g in graphs if g.precision == "fp32")
    deepest = [g for g in graphs if g.level == max(h.level for h in graphs)]
    rows = []
    for size in sizes:
        for batch in batches:
            x = np.random.default_rng(0).random(
                (batch, manifest.in_channels, size, size), dtype=np.float32
            )
            xt = torch.from_numpy(x)

            def eager(xt: torch.Tensor = xt) -> None:
                with torch.no_grad():
                    model(xt)

            steps = {g.name: (lambda s=sessions[g.name], x=x: run_batch(s, x)) for g in graphs}
            # the server's default, for the deepest graphs: fresh sessions with the arena,
            # dropped after this size and batch; not above ARENA_PIXELS (at 512x512x8 the two
            # arenas and the rest took 18 GB, and the kernel killed the process)
            arenas = {
                f"{g.name} (arena on)": create_session(repo / g.file)
                for g in (deepest if batch * size * size <= ARENA_PIXELS else [])
            }
            steps |= {k: (lambda s=s, x=x: run_batch(s, x)) for k, s in arenas.items()}
            steps[EAGER] = eager
            n = repeats if batch == 1 else max(2, math.ceil(repeats / 2))
            times = interleaved_ms(steps, n, warmup=1, settle_s=SETTLE_S)
            scale = (size / manifest.reference_size) ** 2
            flops = {g.name: g.gflops for g in graphs} | {EAGER: full}
            precision = {g.name: g.precision for g in graphs} | {EAGER: "fp32"}
            for g in deepest:  # (arena on) rows, where measured
                flops[f"{g.name} (arena on)"] = g.gflops
                precision[f"{g.name} (arena on)"] = g.precision
            for name, t in times.items():
                ms = float(np.median(t))
                rows.append(
                    {
                        "graph": name,
                        "precision": precision[name],
                        "size": size,
                        "batch": batch,
                        "ms": summary_ms(t),
                        "ms_per_image": round(ms / batch, 2),
                        "images_per_s": round(1000.0 * batch / ms, 2),
                        "gflops": round(flops[name] * scale * batch, 2),
                        "gflops_per_s": round(flops[name] * scale * batch / (ms / 1000.0), 1),
                    }
                )
            del arenas
            print(f"{size}x{size} batch {batch}: done", flush=True)
    return rows


def chart(path: Path, rows: list[dict[str, Any]], peak: float) -> None:
    configs = sorted({(r["size"], r["batch"]) for r in rows})
    names = list(dict.fromkeys(r["graph"] for r in rows))
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(configs)
    for k, (size, batch) in enumerate(configs):
        by = {r["graph"]: r for r in rows if (r["size"], r["batch"]) == (size, batch)}
        xs = np.arange(len(names)) + (k - (len(configs) - 1) / 2) * width
        label = f"{size}x{size}, batch {batch}"
        left.bar(xs, [by[n]["ms_per_image"] if n in by else 0 for n in names], width, label=label)
        right.bar(xs, [by[n]["gflops_per_s"] if n in by else 0 for n in names], width, label=label)
    for ax in (left, right):
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels(
            [n.replace(" (full network)", "\n(full)") for n in names], fontsize=7, rotation=30
        )
        ax.grid(alpha=0.3, axis="y")
    left.set_yscale("log")
    left.set_ylabel("ms per image (log)")
    left.legend(fontsize=7)
    right.axhline(peak, color="k", ls="--", lw=1)
    right.annotate(
        f"fp32 matmul peak {peak:.0f} GFLOP/s",
        (0, peak),
        xytext=(0, 4),
        textcoords="offset points",
        fontsize=8,
    )
    right.set_ylabel("achieved GFLOP/s (int8: same op count)")
    fig.suptitle("Exported graphs (onnxruntime) and PyTorch eager, 2 shared CPU cores", fontsize=10)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_repository_arguments(parser, checkpoint_for="PyTorch eager")
    parser.add_argument("--repeats", type=int, default=10, help="batch 1 (batch 8: half)")
    parser.add_argument("--quick", action="store_true", help="256x256 only, 2 repeats")
    args = parser.parse_args()
    sizes, batches, n = [256, 512], [1, 8], 2048
    if args.quick:
        sizes, args.repeats, n = [256], 2, 1024
    study = Study("levels", args.quick)
    repo, checkpoint = repository(args)
    peak = matmul_peak(n, max(3, args.repeats))
    rows = measure(repo, checkpoint, sizes, batches, args.repeats)
    best_peak = max(peak["numpy"]["gflops_per_s"], peak["onnxruntime"]["gflops_per_s"])
    chart(study.where.plot_path("levels.png"), rows, best_peak)
    study.save(
        repository=shown(repo),
        method=f"median of {args.repeats} runs at batch 1, {max(2, math.ceil(args.repeats / 2))} "
        f"at batch 8, after 1 warm-up; onnxruntime with default threads and the memory arena "
        "off (the server's default keeps it on: the '(arena on)' rows, up to 8 x 256x256, and "
        "the server study's memory table); "
        "all graphs and PyTorch interleaved, "
        f"{int(SETTLE_S * 1000)} ms pause before each run; random input",
        peak=peak,
        peak_gflops_per_s=best_peak,
        rows=rows,
        plots={"chart": "levels.png"},
    )


if __name__ == "__main__":
    main()
