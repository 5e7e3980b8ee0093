"""Template filters: guidelines Markdown rendered with raw HTML shown as text."""

import re

import markdown as md
from django import template
from django.utils.html import escape
from django.utils.safestring import mark_safe

from ..forms import SAFETY, STRENGTHS

register = template.Library()
STRENGTH_LABELS = dict(STRENGTHS)
SAFETY_LABELS = dict(SAFETY)

# After escaping, the only markup left is what Markdown itself writes; links may still carry a script URL.
_UNSAFE_HREF = re.compile(r'(href|src)="(?!https?://|mailto:|/|#)[^"]*"', re.IGNORECASE)


@register.filter
def markdown_safe(text: str) -> str:
    """Markdown to HTML; raw HTML in the source is escaped first, and only http(s), mailto and local links stay."""
    html = md.markdown(escape(text or ""), extensions=["tables", "sane_lists"], output_format="html")
    return mark_safe(_UNSAFE_HREF.sub(r'\1="#"', html))  # noqa: S308 - the input was escaped before conversion


@register.filter
def percent(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


@register.filter
def seconds(ms) -> str:
    return "–" if ms is None else f"{ms / 1000:.1f} s"


@register.filter
def strength_label(value: str) -> str:
    return STRENGTH_LABELS.get(value, value or "–")


@register.filter
def safety_text(value: str) -> str:
    return SAFETY_LABELS.get(value, "–") if value else "–"
