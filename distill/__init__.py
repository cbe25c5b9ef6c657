"""distill: knowledge distillation from several interpolated teachers into a DeepSpeed student."""
import logging

__version__ = "0.1.0"

# transformers imports torchao (the int8 export backend) whenever it is installed; torchao then logs
# that its CUDA-only kernels do not load and torch logs a deprecation about torchao's enums. Neither
# is actionable for a user of this package, and both would be printed by every rank of every command.
logging.getLogger("torchao").setLevel(logging.ERROR)
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
