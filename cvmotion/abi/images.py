"""abi layer: the guest images by name and where the built ones live (``make guests`` → ``build/guests/<name>.elf``).

Names and paths only (no loading): the host daemon checks a request's image and hands its path to the VM
process, which loads it (``vmm.images.load_image``).
"""

from __future__ import annotations

import os
from pathlib import Path

from cvmotion.errors import ImageError

__all__ = ["BUILTIN_IMAGES", "guest_dir", "image_path"]

BUILTIN_IMAGES = ("memdirty", "kvstore", "probe")
_ENV = "CVMOTION_GUEST_DIR"


def guest_dir() -> Path:
    """``$CVMOTION_GUEST_DIR``, else ``build/guests`` of the source tree this package runs from."""
    override = os.environ.get(_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "build" / "guests"


def image_path(name_or_path: str) -> Path:
    """A built-in guest name (``memdirty``) or a path to a multiboot ELF.

    Raises:
        ImageError: a built-in image that was not built, or a path that does not exist.
    """
    if name_or_path in BUILTIN_IMAGES:
        path = guest_dir() / f"{name_or_path}.elf"
        if not path.is_file():
            raise ImageError(f"guest image {name_or_path!r} is not built ({path} missing): run `make guests`")
        return path
    path = Path(name_or_path)
    try:
        found = path.is_file()
    except OSError as exc:  # a name the file system cannot hold (ENAMETOOLONG), ...
        raise ImageError(f"{name_or_path[:200]!r}: not an image file ({exc.strerror})") from None
    if not found:
        raise ImageError(f"{name_or_path}: no such image file (built-in images: {', '.join(BUILTIN_IMAGES)})")
    return path
