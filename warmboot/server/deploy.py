"""Deploying an app: check the request, build (or find) its images, pin them, record the new version.

Everything that can refuse a deploy runs before anything is recorded, so a refused or failed deploy leaves
no half-deployed app behind: the previous version (if any) goes on serving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from warmboot import validation
from warmboot.errors import InvalidOptionError, NotFoundError
from warmboot.protocol import Deploy
from warmboot.server import specs
from warmboot.server.apps import APP_DIR
from warmboot.server.gateway import routes
from warmboot.server.images import ResolvedImage, code_layer, resolve_image
from warmboot.worker import gpus
from warmboot.worker.images import distribute

if TYPE_CHECKING:
    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.deploy")

Emit = Callable[[str], None]


def check_request(plane: ControlPlane, request: Deploy) -> tuple[str, specs.AppSpec]:
    """The app's name and typed spec, once every rule holds; nothing is changed yet."""
    name = request.name or request.spec.get("name")
    if not name:
        raise InvalidOptionError("the App has no name: give it one, App('my-app'), or pass --name")
    validation.name("app", name)
    if name.startswith("ap-"):
        raise InvalidOptionError(f"app name {name!r}: names may not start with 'ap-' (app ids do)")
    if not isinstance(request.filename, str) or not request.filename.endswith(".py") or "/" in request.filename:
        raise InvalidOptionError(f"app file name {request.filename!r}: a file name ending in .py, without a path")
    typed = specs.check(name, request.spec)
    if not typed.functions:
        raise InvalidOptionError(f"app {name!r} defines no @app.function or @app.cls: nothing to deploy")
    for tag, fspec in typed.functions.items():
        label = f"{name}.{tag}"
        if fspec.options.get("gpu") and plane.cluster is None:  # a cluster places it on an agent that has them
            gpus.check_request(fspec.options["gpu"], label)
        for path, volume in fspec.volumes.items():
            if not plane.volume_dir(volume.name).is_dir() and not volume.create_if_missing:
                raise NotFoundError(
                    f"{label}: volume {volume.name!r} (for {path}) does not exist; "
                    "use Volume.from_name(name, create_if_missing=True)"
                )
        for secret in fspec.secrets:
            if secret.name is not None:
                plane.state.get_secret(secret.name)  # NotFoundError names it and says how to create it
    with plane._lock:
        running = list(plane.apps.values())
    routes.check_conflicts(name, request.spec, bool(request.ephemeral), running)
    return name, typed


def deploy(plane: ControlPlane, request: Deploy, emit: Emit) -> dict[str, Any]:
    """Deploy (or, ``ephemeral``, run) an app; ``emit`` streams progress lines to the client."""
    name, typed = check_request(plane, request)
    spec = json.loads(json.dumps(request.spec))  # a copy the server owns; it gains the pinned images below
    functions: dict[str, dict[str, Any]] = spec["functions"]
    for fspec in typed.functions.values():
        for volume in fspec.volumes.values():
            vdir = plane.volume_dir(volume.name)
            if not vdir.is_dir():
                vdir.mkdir(parents=True)
                emit(f"Created volume {volume.name}")
    built: dict[str, ResolvedImage] = {}
    pushed: dict[str, str] = {}
    registry = os.environ.get("WARMBOOT_REGISTRY")
    insecure = os.environ.get("WARMBOOT_REGISTRY_INSECURE") == "1"
    for tag, fspec_json in functions.items():
        key = json.dumps(fspec_json["image"], sort_keys=True)
        if key not in built:
            emit(f"Building image for {name}.{tag}")
            built[key] = resolve_image(fspec_json["image"], plane.home, progress=emit, secrets=plane.secret_env)
            if registry:  # a cluster's agents pull it from there (agent/host.py)
                emit(f"Pushing image {built[key].image.digest[:19]} to {registry}")
                pushed[key] = distribute.push_image(
                    built[key], images_root=plane.home / "images", registry=registry, insecure=insecure, progress=emit
                )
        # The image is pinned here, by digest and layer paths: container starts never build or hash.
        fspec_json["image_digest"] = built[key].image.digest
        fspec_json["resolved_image"] = built[key].to_json()
        if key in pushed:
            fspec_json["image_ref"] = pushed[key]
    code_dir = code_layer(plane.home / "code", request.filename, request.source, APP_DIR)
    previous = None
    if not request.ephemeral:
        with contextlib.suppress(NotFoundError):
            previous = plane.state.deployed(name)
    record = plane.state.add_app(
        name, ephemeral=request.ephemeral, spec=spec, code_dir=str(code_dir), app_file=request.filename
    )
    # Recorded (one transaction): from here on the new version is the deployed one, so nothing below may fail
    # the deploy half-way; what goes wrong is logged against the app instead.
    app = plane.install_app(record, replacing=previous.app_id if previous else None)
    try:
        if not request.ephemeral:
            plane.retain_snapshots(app)
        app.event(
            f"{'Running' if request.ephemeral else 'Deployed'} app {name} version {record.version} "
            f"({', '.join(functions)})"
        )
        app.start_min_containers()
    except Exception as exc:  # the version is live: report, don't unwind
        log.exception("after deploying %s", name)
        app.event(f"Deployed, but a follow-up step failed (see the server log): {type(exc).__name__}: {exc}")
    web = [e for e in plane.web_endpoints() if e["app_id"] == record.app_id]
    return {
        "app_id": record.app_id,
        "name": name,
        "version": record.version,
        "functions": list(functions),
        "web_endpoints": web,
    }
