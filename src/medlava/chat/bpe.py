"""Train a byte-level BPE tokenizer that `transformers.AutoTokenizer` loads from a model folder."""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3, Llama's order for the first three


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, image_token: bool = True):
    """A `PreTrainedTokenizerFast` that prepends <s>; `<image>` is added last (id vocab_size - 1) if asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (1 if image_token else 0),
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if image_token:
        fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast
