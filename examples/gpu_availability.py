# The reference's "GPU availability during the memory snapshot phase" example.
# Adapted to a machine without a GPU: gpu="A10" would be refused at deploy here, so it is left out, and torch is
# pinned to the CPU build on this machine's disk. On a GPU machine, restore gpu="A10": the snap=True hook then
# prints False and the others True.
import warmboot as modal

app = modal.App(image=modal.Image.debian_slim().pip_install("torch==2.13.0"))  # adapted: CPU torch


@app.cls(enable_memory_snapshot=True)  # adapted: gpu="A10" removed
class GPUAvailability:
    @modal.enter(snap=True)
    def no_gpus_available_during_snapshots(self):
        import torch

        print(f"GPUs available: {torch.cuda.is_available()}")  # False

    @modal.enter(snap=False)
    def gpus_available_following_restore(self):
        import torch

        print(f"GPUs available: {torch.cuda.is_available()}")  # True

    @modal.method()
    def demo(self):
        import torch  # adapted: the reference relies on a module-level import

        print(f"GPUs available: {torch.cuda.is_available()}")  # True
