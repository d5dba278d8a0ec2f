"""control layer: the web portal — server-rendered pages over the controller's own API (see routes)."""

from __future__ import annotations

from cvmotion.control.portal.routes import install_portal

__all__ = ["install_portal"]
