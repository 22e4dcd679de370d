"""The smallest warmboot app: `warmboot run examples/hello.py` or `warmboot deploy examples/hello.py`."""

import warmboot as modal

app = modal.App("hello")


@app.function()
def square(x: int = 7) -> int:
    print(f"squaring {x}")
    return x * x


@app.local_entrypoint()
def main() -> None:
    print("square(7) =", square.remote(7))
    print("map:", list(square.map(range(5))))
