"""control layer (portal): the Jinja2 environment (autoescape on) and the filters the templates use."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

__all__ = ["render", "render_fragment"]

_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,  # a template that names a missing value fails loudly in the tests
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: Any) -> str:
    if value is None or value == "":
        return "—"
    try:
        stamp = float(value)
    except (TypeError, ValueError):
        return str(value)[:32]
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ms(value: Any) -> str:
    if value is None or value == "":
        return "—"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)[:32]
    return f"{number:.0f} ms" if number >= 10 else f"{number:.1f} ms"


def _size(value: Any) -> str:
    if value is None or value == "":
        return "—"
    number = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(number) < 1024 or unit == "GiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return f"{number:.1f} GiB"


def _chip(value: Any) -> str:
    text = str(value or "")
    return text[:16] + "…" if len(text) > 16 else text or "—"


_ENV.filters.update(when=_when, ms=_ms, size=_size, chip=_chip)


def render_fragment(template: str, **context: Any) -> str:
    return _ENV.get_template(template).render(**context)


def render(template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    response = HTMLResponse(render_fragment(template, **context), status_code=status)
    # The pages show a user's own data: never cached by a shared proxy, never framed by another site.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    )
    return response
