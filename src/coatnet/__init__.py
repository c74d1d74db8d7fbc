"""coatnet: CoAtNet (Dai et al., NeurIPS 2021) in PyTorch, faithful to the paper.

    >>> import coatnet
    >>> model = coatnet.create_model("coatnet_0", num_classes=10)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["CoAtNet", "CoAtNetConfig", "StemConfig", "MBConvConfig", "TransformerConfig", "HeadConfig", "StageConfig",
           "PretrainedCfg", "compile_for_inference", "create_model", "data_transforms", "from_pretrained",
           "is_model", "list_models", "load_weights", "__version__"]

if TYPE_CHECKING:
    from .models import (CoAtNet, CoAtNetConfig, HeadConfig, MBConvConfig, PretrainedCfg, StageConfig, StemConfig,
                         TransformerConfig, compile_for_inference, create_model, data_transforms, from_pretrained,
                         is_model, list_models, load_weights)


def __getattr__(name: str):
    # The model (and torch) load on first use, not on `import coatnet`: the `coatnet` script imports
    # coatnet.cli before its main() runs, and a Ctrl-C while torch loads must be main's one line, not a traceback.
    if name in __all__ or name == "models":  # `import coatnet` gave coatnet.models too, as it still does
        models = importlib.import_module(".models", __name__)  # which sets coatnet.models
        value = models if name == "models" else getattr(models, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
