"""Built-in compression techniques: importing this package imports every module in it, and each module
registers its techniques with the technique registry (`@register_technique`). Modules whose name starts
with an underscore are helpers and register nothing."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
