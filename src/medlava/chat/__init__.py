"""Prompts and pixels: conversation templates, `render_prompt`, image-token expansion, preprocessing."""

from medlava.chat.messages import render_prompt

__all__ = ["render_prompt"]
