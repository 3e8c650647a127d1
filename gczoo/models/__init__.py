"""Model families of the zoo; importing a family registers its architectures."""
from . import gc_resnet

__all__ = ["gc_resnet"]
