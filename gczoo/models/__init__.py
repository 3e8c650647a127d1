"""Model families of the zoo; importing a family registers its architectures."""
from . import detection, gc_resnet, segmentation

__all__ = ["detection", "gc_resnet", "segmentation"]
