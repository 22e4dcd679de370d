"""Every image build step, in Modal's style: `warmboot run examples/image_steps.py`.

Each step is a cached layer: run it twice and the second build reports every step cached. Edit
image_steps_files/greeting.txt and run again: nothing is rebuilt (it is mounted, not copied), yet the
function sees the new text.
"""

from pathlib import Path

import warmboot as modal

HERE = Path(__file__).parent / "image_steps_files"


def download_model() -> None:
    """Runs once, at build time, inside the image (Modal's run_function): its files become a layer."""
    Path("/models").mkdir(exist_ok=True)
    Path("/models/weights.txt").write_text("pretend these are weights\n")


image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("curl")
    .pip_install_from_requirements(str(HERE / "requirements.txt"))
    .uv_pip_install("tomli")
    .run_commands("echo built at $(date +%F) > /built.txt")
    .run_function(download_model)
    .env({"APP_MODE": "demo"})
    .workdir("/srv/app")
    .add_local_file(HERE / "greeting.txt", "/srv/app/greeting.txt", copy=True)  # baked into a layer
    .add_local_dir(HERE, "/data")  # mounted at each container start
)
app = modal.App("image-steps", image=image)


@app.function()
def inspect() -> dict:
    import os
    import shutil

    import six
    import tomli

    return {
        "cwd": os.getcwd(),
        "APP_MODE": os.environ["APP_MODE"],
        "curl": shutil.which("curl"),
        "six": six.__version__,
        "tomli": tomli.__name__,
        "built": open("/built.txt").read().strip(),
        "weights": open("/models/weights.txt").read().strip(),
        "baked greeting": open("greeting.txt").read().strip(),
        "mounted files": sorted(os.listdir("/data")),
    }


@app.local_entrypoint()
def main() -> None:
    for key, value in inspect.remote().items():
        print(f"{key:>15}: {value}")
