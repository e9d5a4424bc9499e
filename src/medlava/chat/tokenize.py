"""Prompt text to token ids, with each `<image>` expanded to the image's feature positions."""

from __future__ import annotations

from medlava.chat.templates import IMAGE_PLACEHOLDER


def tokenize_prompt(tokenizer, prompt: str, image_token_id: int, image_tokens: int) -> list[int]:
    """Token ids for `prompt`, every `<image>` replaced by `image_tokens` copies of `image_token_id`.

    Tokenizers that know `<image>` (Hugging Face Llava folders) see the expanded text, as the
    HF processor feeds them. Others (original LLaVA checkpoints) get LLaVA's own scheme: each
    text chunk tokenized on its own and the placeholder ids spliced between.
    """
    if tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == image_token_id:
        return tokenizer(prompt.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * image_tokens)).input_ids
    first, *rest = prompt.split(IMAGE_PLACEHOLDER)
    ids = list(tokenizer(first).input_ids)
    for chunk in rest:
        ids += [image_token_id] * image_tokens
        ids += tokenizer(chunk, add_special_tokens=False).input_ids
    return ids
