# The reference's GPU memory snapshot example. It needs an NVIDIA GPU: on a machine without one, deploying it
# fails with an error naming gpu= (GPU memory snapshots are the subject of the GPU issue).
import warmboot as modal

app = modal.App("gpu-memory-snapshot", image=modal.Image.debian_slim().pip_install("torch==2.13.0"))


@app.function(
    gpu="a10",
    enable_memory_snapshot=True,
    experimental_options={"enable_gpu_snapshot": True},
)
def my_gpu_func():
    import torch

    print(f"GPUs available: {torch.cuda.is_available()}")  # True
