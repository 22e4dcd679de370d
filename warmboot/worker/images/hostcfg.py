"""How this host reaches packages, handed to image builds: pip's settings, uv's translation of them, apt's proxy.

A user behind a corporate mirror configures pip and apt once, on the host; builds run in a root filesystem that
knows nothing of that. So every build step gets:

- the host's effective pip settings (config files in pip's own order, then ``PIP_*`` variables) as ``PIP_*``
  variables, which pip in the image obeys whatever its own config files say;
- the same settings translated to ``UV_*`` (uv reads no pip configuration);
- every local path those settings name (find-links directories, ``file://`` indexes, constraint files,
  certificates) bound read-only at the same path;
- apt's proxy and validity settings (``apt-config dump``) in an ``APT_CONFIG`` file, and apt's auth files.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

#: pip settings whose values name local files or directories (``file://`` URLs included).
_PATH_KEYS = ("find-links", "index-url", "extra-index-url", "constraint", "requirement", "cert", "client-cert")
#: apt settings a build needs from the host: proxies, TLS trust, and tolerance of snapshot mirrors.
_APT_KEYS = re.compile(
    r"^Acquire::(https?|ftp)(::[^:\s]+)?::(Proxy|CaInfo|CaPath|Verify-Peer|Verify-Host)\b|"
    r"^Acquire::(https?|ftp)::Proxy\b|^Acquire::Check-(Valid-Until|Date)\b"
)


@dataclass(frozen=True)
class HostPackageConfig:
    """Everything a build step needs to reach packages as the host does."""

    pip: dict[str, str]  #: effective pip settings, option name (``find-links``) -> value
    apt_conf: str  #: apt.conf text (proxy and validity settings), possibly empty
    binds: tuple[str, ...] = field(default=())  #: host paths to bind read-only at the same path

    def pip_env(self) -> dict[str, str]:
        """The pip settings as ``PIP_*`` variables."""
        return {"PIP_" + key.upper().replace("-", "_"): value for key, value in self.pip.items()}

    def uv_env(self) -> dict[str, str]:
        """The pip settings as uv's variables (uv reads neither pip.conf nor ``PIP_*``)."""
        env: dict[str, str] = {"UV_INDEX_STRATEGY": "unsafe-best-match"}  # pip's rule: best version from any index
        pip = self.pip
        if "index-url" in pip:
            env["UV_INDEX_URL"] = pip["index-url"]
        if "extra-index-url" in pip:
            env["UV_EXTRA_INDEX_URL"] = " ".join(pip["extra-index-url"].split())
        if "find-links" in pip:
            env["UV_FIND_LINKS"] = ",".join(pip["find-links"].split())
        if "constraint" in pip:
            env["UV_CONSTRAINT"] = " ".join(pip["constraint"].split())
        if _truthy(pip.get("no-index")):
            env["UV_NO_INDEX"] = "1"
        if _truthy(pip.get("pre")):
            env["UV_PRERELEASE"] = "allow"
        if "trusted-host" in pip:
            env["UV_INSECURE_HOST"] = " ".join(pip["trusted-host"].split())
        if "cert" in pip:
            env["SSL_CERT_FILE"] = pip["cert"]
        if "client-cert" in pip:
            env["SSL_CLIENT_CERT"] = pip["client-cert"]
        timeout = pip.get("timeout") or pip.get("default-timeout")
        if timeout:
            env["UV_HTTP_TIMEOUT"] = timeout
        if "proxy" in pip:
            env["HTTP_PROXY"] = env["HTTPS_PROXY"] = pip["proxy"]
        return env


def load(environ: dict[str, str] | None = None) -> HostPackageConfig:
    """Read the host's pip and apt configuration now (files and the given environment, default ``os.environ``)."""
    environ = dict(os.environ if environ is None else environ)
    pip = pip_settings(environ)
    binds: list[str] = []
    for key in _PATH_KEYS:
        for value in pip.get(key, "").split():
            binds += _local_paths(key, value)
    for auth in ("/etc/apt/auth.conf", "/etc/apt/auth.conf.d"):
        if os.path.exists(auth):
            binds.append(auth)
    return HostPackageConfig(pip=pip, apt_conf=apt_settings(), binds=tuple(dict.fromkeys(binds)))


def pip_config_files(environ: dict[str, str]) -> list[Path]:
    """pip's configuration files on Linux in the order pip reads them (later ones override earlier ones)."""
    env_file = environ.get("PIP_CONFIG_FILE")
    if env_file == os.devnull:  # pip's documented way to read no file at all
        return []
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    xdg_dirs = [d for d in (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":") if d]
    user_dir = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs] + [Path("/etc/pip.conf")]  # global
    files += [home / ".pip" / "pip.conf", user_dir / "pip" / "pip.conf"]  # user (legacy, then current)
    if env_file:
        files.append(Path(env_file))
    return files


def pip_settings(environ: dict[str, str]) -> dict[str, str]:
    """The effective pip settings of ``pip install``: [global] then [install] of each file, then ``PIP_*``."""
    settings: dict[str, str] = {}
    for path in pip_config_files(environ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key, value in parser.items(section):
                    settings[key.replace("_", "-")] = value.strip()
    for name, value in environ.items():
        if name.startswith("PIP_") and name != "PIP_CONFIG_FILE":
            settings[name[4:].lower().replace("_", "-")] = value
    return settings


def apt_settings() -> str:
    """The host's apt proxy, TLS and validity settings as apt.conf text (empty without apt)."""
    try:
        dump = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "".join(line + "\n" for line in dump.splitlines() if _APT_KEYS.match(line))


def _local_paths(key: str, value: str) -> list[str]:
    """The host paths a pip setting's value names, if they exist (for ``file://`` indexes, the index's parent,
    since index pages link their files relatively, as in ``../../files/x.whl``)."""
    if value.startswith("file:"):
        path = unquote(urlparse(value).path)
        if key in ("index-url", "extra-index-url"):
            path = os.path.dirname(path.rstrip("/")) or path
    elif "://" in value:
        return []
    else:
        path = value
    path = os.path.abspath(path)
    return [path] if os.path.exists(path) else []


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
