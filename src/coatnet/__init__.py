"""coatnet: CoAtNet (Dai et al., NeurIPS 2021) in PyTorch, faithful to the paper.

    >>> import coatnet
    >>> model = coatnet.create_model("coatnet_0", num_classes=10)
"""

from .models import (CoAtNet, CoAtNetConfig, HeadConfig, MBConvConfig, PretrainedCfg, StageConfig, StemConfig,
                     TransformerConfig, compile_for_inference, create_model, data_transforms, from_pretrained,
                     list_models, load_weights)

__version__ = "0.1.0"
__all__ = ["CoAtNet", "CoAtNetConfig", "StemConfig", "MBConvConfig", "TransformerConfig", "HeadConfig", "StageConfig",
           "PretrainedCfg", "compile_for_inference", "create_model", "data_transforms", "from_pretrained",
           "list_models", "load_weights", "__version__"]
