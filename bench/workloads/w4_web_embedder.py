"""W4: a FastAPI app that embeds text with all-MiniLM-L6-v2, served as a web endpoint (``@modal.asgi_app``).

``make_web`` builds the FastAPI app; the benchmark also serves the very same app directly with uvicorn (without
the model: its /ping route) to measure what the gateway adds per request.
"""

import warmboot as modal

image = modal.Image.debian_slim().pip_install("torch==2.13.0", "sentence-transformers", "fastapi")
app = modal.App("bench-w4-web", image=image)
model_vol = modal.Volume.from_name("sentence-transformers-models", create_if_missing=True)


def make_web(model=None):
    from fastapi import FastAPI

    web = FastAPI()

    @web.get("/ping")
    def ping():
        return {"ok": True}

    @web.post("/embed")
    def embed(item: dict):
        vector = model.encode([item["text"]], normalize_embeddings=True)[0]
        return {"dims": len(vector), "head": [round(float(x), 4) for x in vector[:4]]}

    return web


@app.cls(volumes={"/models": model_vol}, enable_memory_snapshot=True, max_containers=1)
@modal.concurrent(max_inputs=32)
class WebEmbedder:
    @modal.enter(snap=True)
    def load(self):
        import fastapi  # noqa: F401 - imported before the snapshot, like the model
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer("/models/all-MiniLM-L6-v2", device="cpu")

    @modal.asgi_app()
    def web(self):
        return make_web(self.model)
