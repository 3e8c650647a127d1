"""torch.hub entry points: one per architecture of gczoo's registry (``torch.hub.list``).

``torch.hub.load(repo, "resnet50_gc_r16", pretrained=True)`` loads the default weights;
``tag="tv2_in1k"`` picks other weights; other keyword arguments go to the model builder
(``num_classes``, ``features_only``, ``gc_ratio``, ...), as with ``gczoo.create_model``.
"""
dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors", "requests"]

from gczoo.hub import entrypoints as _entrypoints  # noqa: E402

globals().update(_entrypoints())
