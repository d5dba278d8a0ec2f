"""vmm layer: load a guest image by name or path (the names and the lookup are ``abi.images``)."""

from __future__ import annotations

from cvmotion.abi.images import BUILTIN_IMAGES, guest_dir, image_path
from cvmotion.vmm.loader import KernelImage, read_kernel

__all__ = ["BUILTIN_IMAGES", "guest_dir", "image_path", "load_image"]


def load_image(name_or_path: str) -> KernelImage:
    return read_kernel(image_path(name_or_path))
