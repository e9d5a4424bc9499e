"""Conversation templates with the exact prompt strings the LLaVA family was trained on."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class Template:
    """How turns are joined. `turns` alternate user/assistant, starting with the user.

    An odd number of turns renders a prompt that ends ready for the assistant; an even number
    renders a finished conversation (what training sees).
    """

    name: str
    style: str  # "llama2" ([INST] … [/INST]), "two" (SYSTEM USER: … ASSISTANT:), "hf" (llava-hf chat format)
    system: str = ""
    stop: tuple[str, ...] = ("</s>",)

    def render(self, turns: list[str]) -> str:
        if self.style == "llama2":
            return self._llama2(turns)
        if self.style == "two":
            return self._two(turns)
        return self._hf(turns)

    def _llama2(self, turns: list[str]) -> str:
        # LLaVA's LLAMA_2 separator style: sep "", sep2 "</s>".
        out = ""
        for i, text in enumerate(turns):
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            out += f"[INST] {text} [/INST]" if i % 2 == 0 else f" {text} </s>"
        return out

    def _two(self, turns: list[str]) -> str:
        # LLaVA's TWO separator style: sep " ", sep2 "</s>".
        out = self.system + " "
        for i, text in enumerate(turns):
            role, sep = ("USER", " ") if i % 2 == 0 else ("ASSISTANT", "</s>")
            out += f"{role}: {text}{sep}"
        return out + ("ASSISTANT:" if len(turns) % 2 else "")

    def _hf(self, turns: list[str]) -> str:
        # The llava-hf chat template: "USER: <image>\n… ASSISTANT:" with a space after each text.
        out = ""
        for i, text in enumerate(turns):
            out += f"{'USER' if i % 2 == 0 else 'ASSISTANT'}: {text} "
        return out + ("ASSISTANT:" if len(turns) % 2 else "")


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("mistral_instruct", "llama2"),
        Template("vicuna_v1", "two", VICUNA_SYSTEM),
        Template("llava_v1", "two", LLAVA_SYSTEM),
        Template("llava_hf", "hf"),
    )
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def build_prompt(template: str | Template, question: str, history: list[tuple[str, str]] = ()) -> str:
    """Prompt for `question` about one image placed first (so all questions on it share a prefix).

    `history` holds earlier (question, answer) pairs about the same image.
    """
    if not question.strip():
        raise ValueError("the question is empty")
    t = template if isinstance(template, Template) else get_template(template)
    turns: list[str] = []
    for q, a in history:
        turns += [q, a]
    turns.append(question)
    turns[0] = f"{IMAGE_PLACEHOLDER}\n{turns[0]}"
    return t.render(turns)
