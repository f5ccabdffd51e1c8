"""Render conversations as chat bubbles in HTML (the Data tab's paged preview)."""

from __future__ import annotations

import html

from webui.i18n import tr

ROLES = ("system", "user", "assistant", "tool")  # each labelled by the key chat.role.<role>


def render_conversation(messages: list[dict], title: str = "", max_chars: int = 2000, lang: str | None = None) -> str:
    """One conversation as bubbles, the roles and notes in ``lang``."""
    parts = ['<div class="tl-conv">']
    if title:
        parts.append(f'<div class="tl-conv-head">{html.escape(title)}</div>')
    for msg in messages:
        role = str(msg.get("role", "user"))
        content = str(msg.get("content", ""))
        if len(content) > max_chars:
            content = content[:max_chars] + " " + tr(lang, "chat.more", n=len(content) - max_chars)
        css_role = role if role in ROLES else "user"
        label = tr(lang, f"chat.role.{role}") if role in ROLES else role
        parts.append(
            f'<div class="tl-msg {css_role}"><div class="tl-bubble">'
            f'<span class="tl-role">{html.escape(label)}</span>{html.escape(content)}</div></div>'
        )
    parts.append("</div>")
    return "".join(parts)


def render_page(records: list[list[dict]], page: int, per_page: int, lang: str | None = None) -> str:
    """Records of 1-based ``page`` as bubbles (in ``lang``)."""
    if not records:
        return tr(lang, "chat.none")
    start = (page - 1) * per_page
    chunk = records[start : start + per_page]
    return "".join(
        render_conversation(conv, tr(lang, "chat.record", n=start + i + 1, total=len(records)), lang=lang)
        for i, conv in enumerate(chunk)
    )
