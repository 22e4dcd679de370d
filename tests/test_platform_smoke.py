"""The shortest path through the platform: deploy with the CLI, call with the SDK, run ephemerally."""

from __future__ import annotations

from platform_helpers import Platform


def test_deploy_then_remote_by_name(platform: Platform) -> None:
    path = platform.write_app(
        "smoke_app",
        """
        import warmboot as modal

        app = modal.App("smoke")

        @app.function()
        def square(x):
            print(f"squaring {x}")
            return x * x
        """,
    )
    deployed = platform.cli("deploy", str(path))
    assert "Deployed" in deployed.stderr + deployed.stdout
    out = platform.python(
        """
        import warmboot
        f = warmboot.Function.from_name("smoke", "square")
        print(f.remote(12))
        """
    )
    assert out.stdout.strip() == "144"
    assert "squaring 12" in platform.log_text("smoke")


def test_run_local_entrypoint_streams_output(platform: Platform) -> None:
    path = platform.write_app(
        "smoke_run",
        """
        import warmboot as modal

        app = modal.App("smoke-run")

        @app.function()
        def hello(name):
            print(f"hello from the container, {name}")
            return name.upper()

        @app.local_entrypoint()
        def main():
            print("result:", hello.remote("ada"))
        """,
    )
    proc = platform.cli("run", str(path))
    assert "result: ADA" in proc.stdout
    assert "hello from the container, ada" in proc.stderr
    listed = platform.cli("app", "list").stdout
    assert "smoke-run" not in listed, "the ephemeral app must be stopped when `warmboot run` ends"
