"""TensorFlow Text's op libraries loaded as they are used, not all at import: for the command's own process.

keras-hub imports ``tensorflow_text`` whole, and its package imports all of its ~22 op libraries: 116 MiB
resident after TensorFlow and Keras (measured here), where a keras-hub BERT classifier uses four of them
(normalize, regex split, fast WordPiece, the packer's trimmer). In a one-epoch MiniLM fine-tune command, the
run's peak fell by 84 MiB. ``load_on_demand()``, called before keras-hub is imported, puts a stand-in for the
package in ``sys.modules`` whose attributes import the one submodule that defines them (and so load its
library) on first use:

    from tfl import text_ops
    text_ops.load_on_demand()   # before keras-hub's import
    import keras_hub            # tensorflow_text's ops are not loaded yet
    text_ops.load_all()         # before loading a SavedModel that may use any of them

Any name the stand-in does not map (``tensorflow_text.keras``, ``metrics``, ...) loads the whole package, as a
plain import would. For a command's process only (main.py, a demo job), never on import of tfl: a library
user's ``import tensorflow_text`` must register every op, as the serving processes of tfl.export do.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import types

PACKAGE = "tensorflow_text"
OPS_PACKAGE = "tensorflow_text.python.ops"
# The lines of tensorflow_text/python/ops/__init__.py that name where each public symbol is defined.
_DEFINED_IN = re.compile(r"^from (tensorflow_text\.python\.ops\.\w+) import (\w+)\s*$", re.MULTILINE)
_STAND_IN = "_tfl_stand_in"  # marks the modules load_on_demand put in sys.modules


class _OnDemandPackage(types.ModuleType):
    """tensorflow_text, whose public names import their own submodule on first use (see the module doc)."""

    def __init__(self, name: str, path: list, defined_in: dict):
        super().__init__(name)
        self.__path__ = path  # so that Python imports the real submodules below the stand-in
        self._defined_in = defined_in

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        module = self._defined_in.get(name)
        value = getattr(importlib.import_module(module) if module else _import_whole_package(), name)
        setattr(self, name, value)  # the next use skips __getattr__
        return value


def load_on_demand() -> bool:
    """Installs the stand-in (see the module doc); False, doing nothing, when tensorflow_text is already
    imported, is not installed, or its ops package does not have the layout this reads."""
    if PACKAGE in sys.modules:
        return False
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return False
    ops_dir = os.path.join(list(spec.submodule_search_locations)[0], "python", "ops")
    try:
        with open(os.path.join(ops_dir, "__init__.py"), encoding="utf-8") as init:
            defined_in = {name: module for module, name in _DEFINED_IN.findall(init.read())}
    except OSError:
        return False
    if not defined_in:
        return False
    package = _OnDemandPackage(PACKAGE, list(spec.submodule_search_locations), defined_in)
    package.__spec__, package.__file__ = spec, spec.origin
    ops = types.ModuleType(OPS_PACKAGE)  # without running its __init__, which imports every op library
    ops.__path__ = [ops_dir]
    for module in (package, ops):
        setattr(module, _STAND_IN, True)
        sys.modules[module.__name__] = module
    return True


def load_all() -> types.ModuleType:
    """The whole tensorflow_text package, every op registered (for loading a SavedModel); ImportError where it
    is not installed."""
    if getattr(sys.modules.get(PACKAGE), _STAND_IN, False):
        return _import_whole_package()
    return importlib.import_module(PACKAGE)


def _import_whole_package() -> types.ModuleType:
    """Replaces the stand-ins by the real packages (submodules already imported are reused) and lets the
    package's stand-in, which keras-hub's modules hold, answer from the real package from now on."""
    stand_ins = {name: sys.modules[name] for name in (PACKAGE, OPS_PACKAGE)
                 if getattr(sys.modules.get(name), _STAND_IN, False)}
    for name in stand_ins:
        del sys.modules[name]
    real = importlib.import_module(PACKAGE)
    package = stand_ins.get(PACKAGE)
    if package is not None:
        package._defined_in = {}
        vars(package).update({k: v for k, v in vars(real).items() if not k.startswith("__")})
        package.__version__ = getattr(real, "__version__", None)
    return real
