"""The Procfile's processes as `bin/procfile` (the platform's one reader of it) reads them, for tests."""

import importlib.machinery
import importlib.util
from functools import cache
from pathlib import Path

BIN_PROCFILE = Path(__file__).resolve().parent.parent / "bin" / "procfile"


@cache
def _reader():
    loader = importlib.machinery.SourceFileLoader("bin_procfile", str(BIN_PROCFILE))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def procfile() -> dict[str, str]:
    """Process name -> command line, as the Procfile declares them."""
    return _reader().processes()
