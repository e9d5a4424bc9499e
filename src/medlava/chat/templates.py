"""Conversation templates: the exact prompt strings the LLaVA family was trained on.

Every name in LLaVA-Med's `conv_templates` (llava/conversation.py) renders what its
`Conversation.get_prompt()` renders, byte for byte; `llava/…` names are LLaVA's own (haotian-liu)
renderings where they differ, and `llava_hf` is the llava-hf chat format. See docs/TEMPLATES.md.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
MMTAG_IMAGE = "<Image><image></Image>"  # what the mmtag templates show the model for an image

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
MMTAG_SYSTEM = (  # no space before "The visual content": LLaVA-Med's string has none
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
LLAVA_LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
MPT_SYSTEM = (
    "<|im_start|>system\n"
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
)
CHATML_DIRECT_SYSTEM = "<|im_start|>system\nAnswer the questions."  # LLaVA's chatml_direct
# conv_vicuna_v0 ("default", "v0") opens every prompt with this worked exchange.
V0_EXAMPLE = (
    "What are the key differences between renewable and non-renewable energy sources?",
    "Renewable energy sources are those that can be replenished naturally in a relatively "
    "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
    "Non-renewable energy sources, on the other hand, are finite and will eventually be "
    "depleted, such as coal, oil, and natural gas. Here are some key differences between "
    "renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
    "energy sources are finite and will eventually run out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
    "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
    "and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
    "have lower operational costs than non-renewable sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
    "locations than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
    "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
    "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
)


@dataclass(frozen=True)
class Template:
    """How turns are joined. `turns` alternate user/assistant, starting with the user.

    An odd number of turns renders a prompt that ends ready for the assistant (LLaVA-Med's
    empty last slot, `append_message(roles[1], None)`); an even number renders a finished
    conversation (what training sees).
    """

    name: str
    style: str  # LLaVA's SeparatorStyle: "single", "two", "mpt", "plain", "llama_2"; "two_llava"; "hf"
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str | None = "</s>"
    stop: tuple[str, ...] = ("</s>",)
    mmtag: bool = False  # the image goes in a turn of its own: <Image><image></Image>, answered "Received."
    examples: tuple[str, ...] = ()  # turns every prompt opens with (v0)

    def render(self, turns: list[str]) -> str:
        msgs: list[str | None] = [*self.examples, *self._place_image(list(turns))]
        if len(turns) % 2:
            msgs.append(None)
        return getattr(self, f"_{self.style}")(msgs)

    def _place_image(self, turns: list[str]) -> list[str]:
        # get_prompt's image handling: when the first message carries the image (and is the first
        # of the conversation: not so under v0's examples), its text loses <image> and is stripped;
        # the image goes back in front, or into a turn of its own for mmtag.
        if self.examples or not turns or IMAGE_PLACEHOLDER not in turns[0]:
            return turns
        n = turns[0].count(IMAGE_PLACEHOLDER)
        text = turns[0].replace(IMAGE_PLACEHOLDER, "").strip()
        if self.mmtag:
            return [MMTAG_IMAGE * n, "Received.", text, *turns[1:]]
        return [f"{IMAGE_PLACEHOLDER}\n" * n + text, *turns[1:]]

    def _role(self, i: int) -> str:
        return self.roles[i % 2]

    # Each renderer is LLaVA-Med's get_prompt branch for that style; an empty message is an open slot.
    def _single(self, msgs: list[str | None]) -> str:
        out = self.system + self.sep
        for i, m in enumerate(msgs):
            out += f"{self._role(i)}: {m}{self.sep}" if m else f"{self._role(i)}:"
        return out

    def _two(self, msgs: list[str | None]) -> str:
        # LLaVA-Med strips each message, follows sep2 with a space, and strips the whole prompt.
        out = self.system + self.sep
        for i, m in enumerate(msgs):
            sep = self.sep if i % 2 == 0 else self.sep2 + " "
            out += f"{self._role(i)}: {m.strip()}{sep}" if m else f"{self._role(i)}:"
        return out.strip()

    def _two_llava(self, msgs: list[str | None]) -> str:
        # LLaVA's (haotian-liu) TWO style: no stripping, nothing after sep2.
        out = self.system + self.sep
        for i, m in enumerate(msgs):
            out += f"{self._role(i)}: {m}{self.sep if i % 2 == 0 else self.sep2}" if m else f"{self._role(i)}:"
        return out

    def _mpt(self, msgs: list[str | None]) -> str:
        out = self.system + self.sep
        for i, m in enumerate(msgs):
            out += f"{self._role(i)}{m}{self.sep}" if m else self._role(i)
        return out

    def _plain(self, msgs: list[str | None]) -> str:
        if len(msgs) > 2 or msgs[-1] is not None:
            # LLaVA-Med's sep2 is None here: an answer fails to render (str + None).
            raise ValueError(f"the {self.name!r} template holds one user message and no answers")
        return self.system + (msgs[0] + self.sep if msgs[0] else "")

    def _llama_2(self, msgs: list[str | None]) -> str:
        out = ""
        for i, m in enumerate(msgs):
            if not m:
                continue
            if i == 0 and self.system:
                m = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{m}"
            out += f"{self.sep}[INST] {m} [/INST]" if i % 2 == 0 else f" {m} {self.sep2}"
        return out.lstrip(self.sep)  # LLaVA-Med's lstrip: drops the leading "<s>" (sep "" drops nothing)

    def _hf(self, msgs: list[str | None]) -> str:
        # The llava-hf chat template: "USER: <image>\n… ASSISTANT:" with a space after each text.
        out = ""
        for i, m in enumerate(msgs):
            out += f"{self._role(i)}: {m} " if m is not None else f"{self._role(i)}:"
        return out


def _two(name: str, system: str, **kw) -> Template:
    return Template(name, "two", system, **kw)


def _single(name: str, system: str, **kw) -> Template:
    return Template(name, "single", system, ("Human", "Assistant"), "###", None, ("###",), **kw)


def _llama_2(name: str, system: str, sep: str) -> Template:
    # LLaVA-Med stops these on sep ("<s>", or "" for mistral_instruct: its one-token-answer bug);
    # the assistant's turn really ends with sep2, "</s>".
    return Template(name, "llama_2", system, sep=sep, sep2="</s>", stop=("</s>",))


_PLAIN = dict(style="plain", roles=("", ""), sep="\n", sep2=None, stop=("\n",))
_MPT = dict(
    style="mpt", system=MPT_SYSTEM, roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    sep="<|im_end|>", sep2=None, stop=("<|im_end|>",),
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # LLaVA-Med's conv_templates, in its order.
        _single("default", LLAVA_SYSTEM, examples=V0_EXAMPLE),
        _single("v0", LLAVA_SYSTEM, examples=V0_EXAMPLE),
        _two("v1", VICUNA_SYSTEM),
        _two("vicuna_v1", VICUNA_SYSTEM),
        _llama_2("llama_2", LLAMA_2_SYSTEM, "<s>"),
        _llama_2("mistral_instruct", "", ""),
        Template("plain", **_PLAIN),
        Template("v0_plain", **_PLAIN),
        _single("llava_v0", LLAVA_SYSTEM),
        _single("v0_mmtag", MMTAG_SYSTEM, mmtag=True),
        _two("llava_v1", LLAVA_SYSTEM),
        _two("v1_mmtag", MMTAG_SYSTEM, mmtag=True),
        _llama_2("llava_llama_2", LLAVA_LLAMA_2_SYSTEM, "<s>"),
        Template("mpt", **_MPT),
        # LLaVA's (haotian-liu) renderings of the names whose multi-turn prompts differ.
        Template("llava/v1", "two_llava", VICUNA_SYSTEM),
        Template("llava/vicuna_v1", "two_llava", VICUNA_SYSTEM),
        Template("llava/llava_v1", "two_llava", LLAVA_SYSTEM),
        Template("llava/v1_mmtag", "two_llava", MMTAG_SYSTEM, mmtag=True),
        # LLaVA's names LLaVA-Med lacks.
        Template("chatml_direct", **{**_MPT, "system": CHATML_DIRECT_SYSTEM}),
        Template("mistral_direct", **{**_MPT, "system": CHATML_DIRECT_SYSTEM}),
        # medlava's own: the llava-hf chat format.
        Template("llava_hf", "hf"),
    )
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def build_prompt(template: str | Template, question: str, history: list[tuple[str, str]] = ()) -> str:
    """Prompt for `question` about one image placed first (so all questions on it share a prefix).

    `history` holds earlier (question, answer) pairs about the same image. A thin wrapper over
    `render_prompt`, the one renderer.
    """
    from medlava.chat.messages import question_messages, render_prompt  # messages imports this module

    return render_prompt(question_messages(question, history), template)
