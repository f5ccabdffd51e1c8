"""Render conversations as chat bubbles in HTML (the Data tab's paged preview)."""

from __future__ import annotations

import html

ROLE_LABEL = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def render_conversation(messages: list[dict], title: str = "", max_chars: int = 2000) -> str:
    parts = ['<div class="tl-conv">']
    if title:
        parts.append(f'<div class="tl-conv-head">{html.escape(title)}</div>')
    for msg in messages:
        role = str(msg.get("role", "user"))
        content = str(msg.get("content", ""))
        if len(content) > max_chars:
            content = content[:max_chars] + f" ... [{len(content) - max_chars} more characters]"
        css_role = role if role in ROLE_LABEL else "user"
        parts.append(
            f'<div class="tl-msg {css_role}"><div class="tl-bubble">'
            f'<span class="tl-role">{html.escape(ROLE_LABEL.get(role, role))}</span>{html.escape(content)}</div></div>'
        )
    parts.append("</div>")
    return "".join(parts)


def render_page(records: list[list[dict]], page: int, per_page: int) -> str:
    """Records of 1-based ``page`` as bubbles."""
    if not records:
        return "<p><em>No records to show.</em></p>"
    start = (page - 1) * per_page
    chunk = records[start : start + per_page]
    body = "".join(
        render_conversation(conv, f"Record {start + i + 1} of {len(records)}") for i, conv in enumerate(chunk)
    )
    return body
