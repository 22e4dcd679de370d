"""W0 of `make bench`: a function with no imports, so a cold boot is little more than starting Python.

`warmboot deploy bench/workloads/w0_hello.py`, then
`python -c "import warmboot; print(warmboot.Function.from_name('bench-w0-hello', 'hello').remote())"`.
"""

import warmboot as modal

app = modal.App("bench-w0-hello")


@app.function(enable_memory_snapshot=True)
def hello(name: str = "world") -> str:
    return f"hello, {name}"
