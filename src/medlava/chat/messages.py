"""OpenAI-style chat messages -> a prompt in the model's conversation template, and its images."""

from __future__ import annotations

from dataclasses import replace

from medlava.chat.templates import IMAGE_PLACEHOLDER, Template, get_template


def _content(content) -> tuple[str, list]:
    """OpenAI message content (a string or a list of parts) -> (text, images in order)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not url:
                raise ValueError("an image_url part has no url")
            images.append(url)
        elif kind == "image":
            images.append(part.get("image"))
        else:
            raise ValueError(f"unsupported message content part {kind!r} (use 'text' or 'image_url')")
    return "\n".join(texts), images


def _turns(messages: list[dict]) -> tuple[str | None, list[str], list]:
    """OpenAI-style messages -> (system text or None, turn texts, images in order).

    Each user turn's images come first in that turn, as LLaVA was trained (`<image>\\n` + text).
    """
    system, turns, images = None, [], []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        text, imgs = _content(m.get("content") if isinstance(m, dict) else None)
        if role == "system":
            if turns or imgs:
                raise ValueError("a system message must come first and hold text only")
            system = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"messages must alternate user and assistant turns starting with the user (got {role!r})"
            )
        if imgs and role != "user":
            raise ValueError("only user messages may hold images")
        if role == "user" and not imgs and not text.strip():
            raise ValueError("a user message is empty")
        turns.append(f"{IMAGE_PLACEHOLDER}\n" * len(imgs) + text)
        images += imgs
    if not turns or len(turns) % 2 == 0:
        raise ValueError("the last message must be from the user")
    return system, turns, images


def render_prompt(messages: list[dict], conv_mode: str | Template) -> str:
    """OpenAI-style chat messages -> the prompt in conversation template `conv_mode`.

    The one path from messages to a prompt (the engine's `messages`, `Analyzer`, `build_prompt`).
    Content is a string or a list of parts; an `image_url` (or `image`) part becomes `<image>`.
    A system message replaces the template's system prompt.
    """
    system, turns, _ = _turns(messages)
    template = conv_mode if isinstance(conv_mode, Template) else get_template(conv_mode)
    if system is not None:
        template = replace(template, system=system)
    return template.render(turns)


def render_messages(messages: list[dict], template: str | Template) -> tuple[str, list]:
    """(render_prompt(messages, template), the messages' images in order)."""
    return render_prompt(messages, template), _turns(messages)[2]


def question_messages(question: str, history: list[tuple[str, str]] = ()) -> list[dict]:
    """Messages asking `question` about one image, placed first; `history`: earlier (question, answer) pairs."""
    if not question.strip():
        raise ValueError("the question is empty")
    msgs: list[dict] = []
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    msgs[0] = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": msgs[0]["content"]}]}
    return msgs
