"""The server study's baseline: a naive FastAPI + PyTorch server of the full network.

What one writes by hand: one torch model in eval mode, PIL decode, the same normalisation
recipe as the checkpoint's (so the masks are the same as ours), `model(x)` under no_grad, PIL
PNG encode; no batching, no routing, no queue limit. The model runs in Starlette's thread pool, so
concurrent requests run it concurrently on the same cores.

    UNETPP_BASELINE_CHECKPOINT=runs/paper/unetpp_ds-s0/best.pt \\
        .venv/bin/python -m uvicorn benchmarks.baselines.torch_server:app --port 8001

POST /segment with the image as the body -> the PNG mask (0/255); GET /healthz.
"""

from __future__ import annotations

import io
import os
from contextlib import asynccontextmanager

import numpy as np
import torch
from fastapi import FastAPI, Request, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from unetpp.core.preprocess import crop_to, network_input
from unetpp.model.checkpoint import load_checkpoint

state: dict = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    ckpt = load_checkpoint(os.environ["UNETPP_BASELINE_CHECKPOINT"])
    state["model"], state["preprocessing"] = ckpt.build().eval(), ckpt.preprocessing
    yield
    state.clear()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def predict(data: bytes) -> bytes:
    image = np.asarray(Image.open(io.BytesIO(data)))
    x, size = network_input(image, state["preprocessing"])
    with torch.no_grad():
        logits = state["model"](torch.from_numpy(x)[None])[0, 0].numpy()
    mask = crop_to(logits, size) > 0.0  # sigmoid > 0.5
    out = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


@app.post("/segment")
async def segment(request: Request) -> Response:
    return Response(await run_in_threadpool(predict, await request.body()), media_type="image/png")
