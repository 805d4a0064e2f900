"""Jinja2 email templates: a folder per template with subject.txt, text.txt and optionally html.html."""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
    select_autoescape,
)

from proj.errors import InvalidEmailError

DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / "templates" / "email"
_NAME = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")


@lru_cache(maxsize=4)
def _environment(folder: str) -> Environment:
    """One environment per folder: HTML autoescaped, a missing variable an error, not a blank."""
    return Environment(
        loader=FileSystemLoader(folder or str(DEFAULT_FOLDER)),
        autoescape=select_autoescape(["html", "htm", "xml"]),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )


def render(name: str, context: Mapping[str, Any], folder: str = "") -> tuple[str, str, str | None]:
    """Render template `name` into (subject, text, html or None).

    Raises:
        InvalidEmailError: the template is unknown, or the context lacks a variable it uses.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidEmailError(f"template: {name!r} is not a template name")
    if not isinstance(context, Mapping):
        raise InvalidEmailError("context: expected a mapping of names to values")
    env = _environment(folder)
    try:
        subject = env.get_template(f"{name}/subject.txt").render(context).strip()
        text = env.get_template(f"{name}/text.txt").render(context)
        html = _optional(env, f"{name}/html.html", context)
    except TemplateNotFound:
        raise InvalidEmailError(f"template: unknown template {name!r}") from None
    except TemplateError as exc:
        raise InvalidEmailError(f"template {name!r}: {exc}") from None
    return subject, text, html


def check_template(name: str, folder: str = "") -> None:
    """Raise InvalidEmailError unless template `name` exists (before rendering it per recipient)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidEmailError(f"template: {name!r} is not a template name")
    try:
        _environment(folder).get_template(f"{name}/text.txt")
    except TemplateNotFound:
        raise InvalidEmailError(f"template: unknown template {name!r}") from None


def _optional(env: Environment, path: str, context: Mapping[str, Any]) -> str | None:
    """Render a template that may not exist."""
    try:
        template = env.get_template(path)
    except TemplateNotFound:
        return None
    return template.render(context)
