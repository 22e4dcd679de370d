"""An image pulled from an OCI registry, with Python added: `warmboot run examples/from_registry.py`.

Point REGISTRY_IMAGE at any image; registries on loopback (127.0.0.1:5000/...) are used without TLS, as
Docker does. `add_python` puts a Python into images that have none.
"""

import os

import warmboot as modal

REGISTRY_IMAGE = os.environ.get("REGISTRY_IMAGE", "127.0.0.1:5000/debian:bookworm-slim")

image = modal.Image.from_registry(REGISTRY_IMAGE, add_python="3.11").pip_install("six")
app = modal.App("from-registry", image=image)


@app.function()
def describe() -> str:
    import sys

    import six

    return f"Python {sys.version.split()[0]} at {sys.executable}, six {six.__version__}"


@app.local_entrypoint()
def main() -> None:
    print(describe.remote())
