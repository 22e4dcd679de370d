"""warmboot: serverless Python functions on your own machines, with memory-snapshot cold starts.

Written for Modal? ``import warmboot as modal`` and the rest of your app stays as it is.
"""

from warmboot import exception, functions
from warmboot.errors import WarmbootError
from warmboot.sdk.app import App
from warmboot.sdk.batching import batched
from warmboot.sdk.concurrency import concurrent
from warmboot.sdk.function import Cls, Function, FunctionCall
from warmboot.sdk.image import Image
from warmboot.sdk.parameter import parameter
from warmboot.sdk.partial import enter, exit, method
from warmboot.sdk.retries import Retries
from warmboot.sdk.running import current_function_call_id, enable_output, is_local
from warmboot.sdk.schedule import Cron, Period
from warmboot.sdk.secret import Secret
from warmboot.sdk.volume import Volume
from warmboot.sdk.web import asgi_app, fastapi_endpoint, web_endpoint, web_server, wsgi_app

__version__ = "0.1.0"
__all__ = [
    "App",
    "Cls",
    "Cron",
    "Function",
    "FunctionCall",
    "Image",
    "Period",
    "Retries",
    "Secret",
    "Volume",
    "WarmbootError",
    "asgi_app",
    "batched",
    "concurrent",
    "current_function_call_id",
    "enable_output",
    "enter",
    "exception",
    "exit",
    "fastapi_endpoint",
    "functions",
    "is_local",
    "method",
    "parameter",
    "web_endpoint",
    "web_server",
    "wsgi_app",
]
