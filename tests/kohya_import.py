"""Import kohya-ss/sd-scripts modules beside the project, for the kohya tier (``KOHYA_SD_SCRIPTS`` = a checkout).

kohya's ``library.utils`` imports torchvision / cv2 / imagesize for image code the tests never call; where one of
them is not installed it is stubbed for the duration of the import only, so nothing else sees the stub.
"""

from __future__ import annotations

import importlib
import os
import sys
import types


class _Stub(types.ModuleType):
    def __getattr__(self, n):
        if n.startswith("__"):
            raise AttributeError(n)
        return _Stub(f"{self.__name__}.{n}")

    def __call__(self, *a, **k):
        return None


def import_kohya(*names: str) -> list[types.ModuleType]:
    """Import ``names`` (e.g. ``"library.flux_models"``, ``"networks.lora_flux"``) from ``$KOHYA_SD_SCRIPTS``.

    Raises ``KeyError`` when ``KOHYA_SD_SCRIPTS`` is unset (callers skip the test before) and ``ImportError`` when
    the checkout lacks a module."""
    stubbed = []
    try:
        for m in ("torchvision", "torchvision.transforms", "cv2", "imagesize"):
            if m in sys.modules:
                continue
            try:
                __import__(m)
            except ImportError:
                sys.modules[m] = _Stub(m)
                stubbed.append(m)
        root = os.environ["KOHYA_SD_SCRIPTS"]
        if root not in sys.path:
            sys.path.insert(0, root)
        return [importlib.import_module(n) for n in names]
    finally:
        for m in stubbed:
            sys.modules.pop(m, None)
