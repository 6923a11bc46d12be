"""The built-in models' tokenizer: byte-level BPE with single-digit tokens and the chat roles as special
tokens, trained in code on a corpus generated in code from a fixed seed (deterministic, no download)."""

from __future__ import annotations

import random

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    """Byte-level BPE with single-digit tokens, trained on `tokenizer_corpus()` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tokenizer


_WORDS = (
    "the of and to in is it that for on with as was be by at this are from or have an they which one you "
    "were all we when there can an your more if no out so what up its about into than them only other new "
    "some could time these two may then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against "
    "go came right used take three what is plus minus times reverse copy count letters word answer question "
    "sort upper lower first last sum number digit add subtract multiply zero one two three four five six "
    "seven eight nine ten apple banana cherry river stone cloud light water fire earth green blue red"
).split()


def tokenizer_corpus() -> list[str]:
    """Text the built-in tokenizers are trained on: words, chat turns and arithmetic, from a fixed seed."""
    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(words)
        lines.append(f"<|user|>What is {a}+{b}?<|end|><|assistant|>{a + b}<|end|>")
        lines.append(f"<|user|>Reverse the word {rng.choice(_WORDS)}.<|end|><|assistant|>")
    return lines
