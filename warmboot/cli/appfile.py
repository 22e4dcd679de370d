"""Loading a user's app file: import it, find its ``App``, and say clearly what went wrong when it fails."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from warmboot.errors import AppFileError, WarmbootError
from warmboot.sdk.app import App


def load(path_text: str) -> tuple[Path, ModuleType, App]:
    """Import the app file at ``path_text`` and return (path, module, the App it defines)."""
    path = Path(path_text).resolve()
    if not path.is_file():
        raise AppFileError(f"no such app file: {path_text}")
    if path.suffix != ".py":
        raise AppFileError(f"{path_text} is not a Python file (.py)")
    name = path.stem
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        where = f"{exc.filename}, line {exc.lineno}"
        text = (exc.text or "").rstrip()
        raise AppFileError(f"syntax error in {path_text} ({where}): {exc.msg}\n    {text}") from None
    except Exception as exc:  # noqa: BLE001 - any failure at import is the app file's, shown with its traceback
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        if isinstance(exc, WarmbootError) and frames:  # misuse of warmboot (a bad option): point at the line
            raise AppFileError(f"{path_text}, line {frames[-1].lineno}: {exc}\n    {frames[-1].line}") from None
        tb_start = exc.__traceback__
        while tb_start is not None and tb_start.tb_frame.f_code.co_filename != str(path):
            tb_start = tb_start.tb_next  # skip the loader's own frames
        tb = "".join(traceback.format_exception(type(exc), exc, tb_start or exc.__traceback__)[1:])
        raise AppFileError(f"{path_text} raised {type(exc).__name__} while being imported:\n{tb}") from None
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if not apps:
        raise AppFileError(f"{path_text} defines no warmboot App (expected e.g. `app = warmboot.App('name')`)")
    if len(apps) > 1:
        named = [a for a in apps if getattr(module, "app", None) is a]
        if not named:
            raise AppFileError(f"{path_text} defines {len(apps)} Apps; name the one to use `app`")
        apps = named
    return path, module, apps[0]
