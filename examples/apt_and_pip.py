"""An image with a Debian package and a PyPI package: `warmboot run examples/apt_and_pip.py`.

scikit-learn's wheels link against the GNU OpenMP runtime, which Debian ships as libgomp1.
"""

import warmboot as modal

image = modal.Image.debian_slim(python_version="3.11").apt_install("libgomp1").pip_install("scikit-learn")
app = modal.App("apt-and-pip", image=image)


@app.function()
def fit(n: int = 200) -> dict:
    import platform

    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    x, y = make_classification(n_samples=n, n_features=8, random_state=0)
    model = LogisticRegression(max_iter=500).fit(x, y)
    with open("/etc/os-release") as f:
        distro = next(line.split("=", 1)[1].strip().strip('"') for line in f if line.startswith("PRETTY_NAME="))
    return {"accuracy": round(model.score(x, y), 3), "python": platform.python_version(), "os": distro}


@app.local_entrypoint()
def main() -> None:
    print(fit.remote())
