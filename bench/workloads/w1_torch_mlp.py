"""W1 of `make bench`: `import torch` (CPU) and a forward pass of a small MLP.

torch is pinned to the CPU build on this machine's disk: an unpinned torch would pull a multi-GB CUDA build.
The import happens in global scope, so the memory snapshot holds an imported torch; the MLP is built from a
fixed seed inside the call, so cold-booted and restored containers return the same numbers.
"""

import warmboot as modal

image = modal.Image.debian_slim().pip_install("torch==2.13.0")
app = modal.App("bench-w1-torch-mlp", image=image)

with image.imports():
    import torch


@app.function(enable_memory_snapshot=True)
def forward(batch: int = 8) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        x = torch.randn(batch, 64, generator=generator)
        return mlp(x).sum(dim=1).tolist()
