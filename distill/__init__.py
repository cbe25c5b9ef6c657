"""distill: knowledge distillation from several interpolated teachers into a DeepSpeed student.

The Python API (`distill.api`, re-exported here): `load_config`, `train`, `evaluate`, `export`,
`fit_weights`, `cache`. Importing this package loads no heavy library; each function does when called.
"""
import logging

from distill.api import cache, evaluate, export, fit_weights, load_config, plan, sweep, train

__version__ = "0.1.0"
__all__ = ["load_config", "train", "evaluate", "export", "fit_weights", "cache", "plan", "sweep", "__version__"]

# transformers imports torchao (the int8 export backend) whenever it is installed; torchao then logs
# that its CUDA-only kernels do not load and torch logs a deprecation about torchao's enums. Neither
# is actionable for a user of this package, and both would be printed by every rank of every command.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
