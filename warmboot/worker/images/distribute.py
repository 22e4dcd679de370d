"""Images between machines: a deployed image pushed to an OCI registry, pulled and unpacked by each agent.

In multi-machine mode the control plane builds every image (:func:`~warmboot.server.images.resolve_image`) and
agents on other machines run the containers. :func:`push_image` publishes a :class:`ResolvedImage` (the built
image plus its ``add_local_*`` layers) as one OCI image, ``REGISTRY/warmboot/images:TAG``, and returns the
reference pinned by manifest digest; an agent's :func:`pull_image` turns that reference back into a
:class:`ResolvedImage` whose layers are directories on the agent.

Why it is done this way:

- The transfer is skopeo's, as for registry bases (:mod:`~warmboot.worker.images.registry`): it speaks the
  registry protocol, skips blobs the other side has, verifies every blob's digest, and gzips the layers for the
  registry (the agent's unpacker reads gzip; the config's ``diff_ids`` stay those of the uncompressed tars).
- The image is written as an OCI image in the layout every build is recorded in (``<root>/oci``), so its layer
  blobs are the ones :func:`~warmboot.worker.images.record.record_image` made (tarring an unchanged layer again
  costs one ``stat``).
- The agent unpacks each layer on its own into ``<root>/layers/oci-<diff_id>/``, the directories
  :func:`~warmboot.worker.images.registry.pull_base` makes too, shared by every image that has the layer, with
  :func:`~warmboot.worker.images.layers.unpack_layer` (whiteouts and opaque directories converted back for
  overlayfs; contents, owners, modes, links and ``user.*`` xattrs kept, mtimes to the second, which is what
  the layer tar format keeps; CRIU checks a mapped file's size and mode, not its mtime). Not umoci or
  ``skopeo copy dir:``: they merge an image's layers into one root filesystem, while warmboot stacks the layers
  with overlayfs and shares them between images.
- What is not in an OCI config travels in its labels (``org.warmboot.*``): warmboot's image digest (snapshot
  keys contain it, so the agent's image must keep the control plane's), the interpreter, the ``copy=False``
  local mounts, and how many of the top layers are the local layers.
- The reference is pinned by digest, so an agent runs exactly what was deployed, and a pull that finished once
  is answered from ``<root>/pulled/<manifest hex>.json`` with no registry at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from warmboot.errors import HostSetupError, ImageBuildError, InvalidOptionError
from warmboot.server.images import ResolvedImage
from warmboot.worker.images.build import BuiltImage
from warmboot.worker.images.commands import run_streaming
from warmboot.worker.images.fsutil import atomic_write, flock
from warmboot.worker.images.local_files import LocalMount
from warmboot.worker.images.oci import (
    MEDIA_CONFIG,
    MEDIA_MANIFEST,
    REF_ANNOTATION,
    LayerDescriptor,
    Layout,
    canonical_json,
    digest_hex,
)
from warmboot.worker.images.record import record_image
from warmboot.worker.images.registry import ImageRef, copy_into_layout, unpack_layers

Progress = Callable[[str], None]

#: The repository every image is pushed to, under the registry given.
REPOSITORY = "warmboot/images"
#: Bumped when the labels below change meaning; an agent refuses images of another format.
DIST_FORMAT = "1"
LABEL_FORMAT = "org.warmboot.format"
LABEL_DIGEST = "org.warmboot.digest"
LABEL_PYTHON = "org.warmboot.python"
LABEL_LOCAL_LAYERS = "org.warmboot.local-layers"
LABEL_LOCAL_MOUNTS = "org.warmboot.local-mounts"


# ----------------------------------------------------------------------------------------------------------------
# Control plane: push


def push_image(resolved: ResolvedImage, *, images_root: Path, registry: str, insecure: bool, progress: Progress) -> str:
    """Push ``resolved`` to ``registry`` (``host:port``); returns ``registry/warmboot/images@sha256:<hex>``.

    The image's layers come from its record in the OCI layout ``images_root/oci`` (``warmboot/<digest>``, written
    by the build; written again here if it is missing), and its local layers are tarred on top of them. The tag
    is the image's digest, plus a hash of the local layers' contents when it has some: the same image deployed
    with other local files is another image, and must not take the tag of one a running deploy still pins.

    Idempotent and cheap the second time: when the registry's manifest under that tag has this image's config
    (which names every layer by content), nothing is copied. ``insecure`` reaches the registry over plain HTTP
    (or HTTPS without checking its certificate). Raises :class:`ImageBuildError` naming the destination when the
    registry refuses the push or cannot be reached.
    """
    root = Path(images_root)
    image = resolved.image
    layout = Layout(root / "oci")
    layout.ensure()
    base_name = f"warmboot/{image.digest}"
    try:
        base_digest = layout.manifest_digest(base_name)
    except ImageBuildError:
        # Recorded by every build since the layout exists; an older home may lack it: record it now.
        progress(f"[push] recording image {image.digest} in {layout.path}")
        record_image(root, image, {}, progress)
        base_digest = layout.manifest_digest(base_name)
    manifest = json.loads(layout.read_blob(base_digest))
    layers, _ = layout.read_manifest(base_digest)
    if len(layers) != len(image.layers):
        raise ImageBuildError(
            f"image {image.digest}: the OCI layout {layout.path} records {len(layers)} layers for its "
            f"{len(image.layers)}; delete {root / 'images' / (image.digest + '.json')} and deploy again to rebuild it"
        )
    local = [layout.write_layer(p) for p in resolved.local_layers]
    tag = image.digest
    if local:
        tag += "-" + hashlib.sha256(" ".join(d.diff_id for d in local).encode()).hexdigest()[:16]
    target = ImageRef.parse(f"{registry}/{REPOSITORY}:{tag}")
    config_digest = _write_dist_image(layout, manifest, [*layers, *local], resolved, f"warmboot/dist/{tag}")

    skopeo = _skopeo()
    existing = _registry_manifest(skopeo, target, insecure)
    if existing is not None and _config_of(existing) == config_digest:
        pushed = target.pinned("sha256:" + hashlib.sha256(existing).hexdigest())
        progress(f"[push] {target}: already in the registry as {pushed}")
        return pushed
    progress(f"[push] {target}")
    with tempfile.TemporaryDirectory(prefix="warmboot-push-") as tmp:
        digest_file = Path(tmp) / "digest"
        argv = [skopeo, "copy", "--quiet=false", "--retry-times", "2", "--digestfile", str(digest_file)]
        argv += ["--dest-tls-verify=false"] if insecure else []
        argv += [f"oci:{layout.path}:warmboot/dist/{tag}", f"docker://{target}"]
        # No layout lock: skopeo only reads, and index.json is replaced atomically (a push can take minutes,
        # and builds recording their images must not wait for it).
        rc, tail = run_streaming(argv, progress, prefix="[push] ", c_locale=True, skip_blank=True)
        if rc != 0:
            raise ImageBuildError(
                f"could not push image {image.digest} to {target}: skopeo exited {rc}:\n{_quote(tail)}\n"
                + _advice(tail, target, insecure, pushing=True)
            )
        pushed = target.pinned(digest_file.read_text().strip())
    progress(f"[push] {target}: {pushed}")
    return pushed


def _write_dist_image(
    layout: Layout,
    base_manifest: dict[str, Any],
    layers: Sequence[LayerDescriptor],
    resolved: ResolvedImage,
    name: str,
) -> str:
    """Write the pushed image (the built image's config, labelled, over ``layers``) and name it; returns its config
    digest. The built image's config is the one the build recorded, so architecture, env and workdir are its."""
    image = resolved.image
    config = json.loads(layout.read_blob(base_manifest["config"]["digest"]))
    mounts = [[m.local, m.remote, list(m.ignore)] for m in image.local_mounts]
    labels = {
        LABEL_FORMAT: DIST_FORMAT,
        LABEL_DIGEST: image.digest,
        LABEL_PYTHON: image.python,
        LABEL_LOCAL_LAYERS: str(len(resolved.local_layers)),
        LABEL_LOCAL_MOUNTS: json.dumps(mounts, separators=(",", ":")),
    }
    config.setdefault("config", {})["Labels"] = labels
    # The image's env and workdir as the build made them (the recorded config has them too; this makes sure).
    config["config"]["Env"] = [f"{k}={v}" for k, v in image.env.items()]
    config["config"]["WorkingDir"] = image.workdir
    config["rootfs"] = {"type": "layers", "diff_ids": [d.diff_id for d in layers]}
    config_blob = canonical_json(config)
    config_digest = layout.write_blob(config_blob)
    manifest_blob = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_blob)},
            "layers": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in layers],
        }
    )
    manifest_digest = layout.write_blob(manifest_blob)
    index_path = layout.path / "index.json"
    with layout.lock():  # the same protocol as Layout.write_image: replace the name's entry under the lock
        index = json.loads(index_path.read_text())
        entries = [m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_ANNOTATION) != name]
        entries.append(
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest_blob),
                "annotations": {REF_ANNOTATION: name},
            }
        )
        index["manifests"] = entries
        atomic_write(index_path, json.dumps(index, indent=2).encode())
    return config_digest


def _config_of(manifest: bytes) -> str | None:
    """The config digest a raw manifest names (None for anything else, e.g. an index)."""
    try:
        return str(json.loads(manifest)["config"]["digest"])
    except (ValueError, KeyError, TypeError):
        return None


def _registry_manifest(skopeo: str, target: ImageRef, insecure: bool) -> bytes | None:
    """The raw manifest the registry has under ``target``'s tag, or None (no such tag, or no answer)."""
    argv = [skopeo, "inspect", "--raw", *(["--tls-verify=false"] if insecure else []), f"docker://{target}"]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc = subprocess.run(argv, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        if proc.returncode == 0:
            return proc.stdout
    return None


# ----------------------------------------------------------------------------------------------------------------
# Agent: pull


def pull_image(ref: str, *, images_root: Path, insecure: bool, progress: Progress) -> ResolvedImage:
    """The image :func:`push_image` pushed as ``ref``, pulled into ``images_root`` and unpacked: ready to run.

    The returned image has the control plane's digest, env, workdir, interpreter and local mounts; its layers
    are directories under ``images_root/layers/``, the local layers the top ones. skopeo copies the image into
    the layout ``images_root/oci`` (blobs already there are not fetched), each layer is unpacked once (a layer
    another image has is not unpacked again), and the result is kept in ``images_root/pulled/<hex>.json``: a
    later call for the same ``ref`` runs no skopeo and needs no registry. Concurrent pulls of one reference wait
    for each other (``flock``), of different ones share layers safely.

    ``ref`` must be pinned by digest (what :func:`push_image` returns). A registry that cannot be reached or an
    image it does not have raises :class:`ImageBuildError` naming ``ref`` and what to do.
    """
    parsed = ImageRef.parse(ref)
    if parsed.digest is None:
        raise InvalidOptionError(
            f"pull_image({ref!r}): the reference must be pinned by digest (registry/warmboot/images@sha256:...), "
            "as push_image returns it, so that agents run exactly the deployed image"
        )
    root = Path(images_root)
    hex_ = digest_hex(parsed.digest)
    cache = root / "pulled" / f"{hex_}.json"
    if (hit := _cached(cache)) is not None:
        return hit
    with flock(root / "pulled" / f".{hex_}.lock"):
        if (hit := _cached(cache)) is not None:  # pulled by a concurrent caller while this one waited
            return hit
        layout = Layout(root / "oci")
        layout.ensure()
        name = f"warmboot/pulled/{hex_}"
        if not _in_layout(layout, name, parsed.digest):
            source = parsed.pinned(parsed.digest)
            rc, tail = copy_into_layout(source, layout, name, insecure=insecure, progress=progress, ref=ref)
            if rc != 0:
                raise ImageBuildError(
                    f"could not pull image {ref}: skopeo exited {rc}:\n{_quote(tail)}\n"
                    + _advice(tail, parsed, insecure, pushing=False)
                )
        resolved = _unpack(layout, ref, parsed.digest, root, progress)
        atomic_write(cache, json.dumps(resolved.to_json(), indent=2) + "\n")
    progress(f"[pull] {ref}: {len(resolved.image.layers) + len(resolved.local_layers)} layers ready")
    return resolved


def _unpack(layout: Layout, ref: str, manifest_digest: str, root: Path, progress: Progress) -> ResolvedImage:
    """Unpack the layers of the pulled image and read its labels back into a :class:`ResolvedImage`."""
    descriptors, config = layout.read_manifest(manifest_digest)
    config_json = json.loads(layout.read_blob(json.loads(layout.read_blob(manifest_digest))["config"]["digest"]))
    labels = (config_json.get("config") or {}).get("Labels") or {}
    if labels.get(LABEL_FORMAT) != DIST_FORMAT or LABEL_DIGEST not in labels:
        raise ImageBuildError(
            f"{ref} is not an image pushed by this version of warmboot (its config has {LABEL_FORMAT}="
            f"{labels.get(LABEL_FORMAT)!r}, expected {DIST_FORMAT!r}); deploy the app again to push it"
        )
    n_local = int(labels[LABEL_LOCAL_LAYERS])
    layers = unpack_layers(layout, descriptors, root, progress)
    split = len(layers) - n_local
    mounts = tuple(LocalMount(m[0], m[1], tuple(m[2])) for m in json.loads(labels.get(LABEL_LOCAL_MOUNTS, "[]")))
    image = BuiltImage(
        digest=labels[LABEL_DIGEST],
        layers=tuple(layers[:split]),
        env=dict(config.env),
        workdir=config.workdir,
        python=labels[LABEL_PYTHON],
        local_mounts=mounts,
    )
    return ResolvedImage(image, tuple(layers[split:]))


def _cached(cache: Path) -> ResolvedImage | None:
    """The image a finished pull recorded in ``cache``, if the file and every layer directory it names exist."""
    try:
        resolved = ResolvedImage.from_json(json.loads(cache.read_text()))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if all(p.is_dir() for p in (*resolved.image.layers, *resolved.local_layers)):
        return resolved
    return None  # a layer was removed since: unpack again (from the layout's blobs, without the registry)


def _in_layout(layout: Layout, name: str, manifest_digest: str) -> bool:
    """Whether an earlier pull left the whole image in the layout (its manifest, config and layer blobs)."""
    try:
        if layout.manifest_digest(name) != manifest_digest:
            return False
        descriptors, _ = layout.read_manifest(manifest_digest)
    except (ImageBuildError, ValueError, KeyError):
        return False
    return all(layout.has_blob(d.digest) for d in descriptors)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def _skopeo() -> str:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise HostSetupError("moving images through a registry needs skopeo: install it (apt-get install skopeo)")
    return skopeo


def _quote(tail: Sequence[str]) -> str:
    return "\n".join(f"  {line}" for line in tail)


def _advice(tail: Sequence[str], ref: ImageRef, insecure: bool, *, pushing: bool) -> str:
    """What to do, from what skopeo said: the image is missing, or the registry cannot be reached, or else."""
    text = "\n".join(tail).lower()
    if any(s in text for s in ("manifest unknown", "not found", "name unknown")):
        return (
            f"The registry {ref.registry} has no such image: it was never pushed there, or was deleted. Deploy the "
            "app again so that the control plane pushes its images."
        )
    if "http response to https client" in text and not insecure:
        return f"The registry {ref.registry} speaks plain HTTP: configure it as insecure."
    unreachable = ("connection refused", "no such host", "i/o timeout", "no route to host", "network is unreachable")
    if any(s in text for s in unreachable):
        side = "this host" if pushing else "this agent"
        return (
            f"The registry {ref.registry} is unreachable from {side}: check that it is running, that the address "
            "is right and that no firewall is in the way."
        )
    what = "push to" if pushing else "pull from"
    return f"Check that the registry {ref.registry} is running and accepts this {what}."
