"""The HTTP service: a model repository -> onnxruntime sessions -> router -> batcher -> FastAPI.

Never imports torch, unetpp.model or unetpp.export (the serving image installs only the `serve`
extra). `create_app` builds the application; `unetpp serve` runs it with uvicorn.
"""
