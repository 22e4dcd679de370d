"""Dynamic batching: callers send single inputs, the function runs on lists of them.

warmboot run examples/batching.py
"""

import warmboot as modal

app = modal.App("example-batching")


@app.function()
@modal.batched(max_batch_size=8, wait_ms=200)
def embed(texts: list[str]) -> list[list[float]]:
    # One call per batch: a model would run its forward pass once over the whole list here.
    print(f"embedding a batch of {len(texts)}")
    return [[float(len(t)), float(sum(map(ord, t)) % 97)] for t in texts]


@app.cls()
class Adder:
    @modal.enter()
    def setup(self):
        self.offset = 1000

    @modal.batched(max_batch_size=4, wait_ms=100)
    async def add(self, xs: list[int], ys: list[int]) -> list[int]:
        return [x + y + self.offset for x, y in zip(xs, ys, strict=True)]


@app.local_entrypoint()
def main():
    words = ["warm", "boot", "batches", "inputs", "together", "so", "models", "run", "fewer", "times"]
    vectors = list(embed.map(words))
    print(f"{len(vectors)} vectors, first {vectors[0]}")
    adder = Adder()
    print(list(adder.add.map(range(6), range(6))))
