"""Model families of the zoo; importing a family registers its architectures."""
from . import detection, gc_resnet

__all__ = ["detection", "gc_resnet"]
