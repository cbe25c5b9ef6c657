"""distill: knowledge distillation from several interpolated teachers into a DeepSpeed student."""
__version__ = "0.1.0"
