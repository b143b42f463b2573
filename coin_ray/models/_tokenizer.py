"""The tiny model's tokenizer, built offline with the `tokenizers` library (no hub, no training run).

A sentencepiece-style Unigram model over a fixed vocabulary: whole-word pieces for the words of the
chat template, CoIN's instruction lines and the synthetic benchmark (so prompts stay short), one piece
per printable ASCII character with and without the word-start marker (so any ASCII text encodes, and
digits and punctuation are always single tokens: "[0.12, 0.50]" round-trips), and byte-fallback pieces
for everything else. The vocabulary is a constant, so the same tokenizer comes out on every machine;
coverage only changes sequence length, never correctness (an unknown word is spelled out).
"""
from __future__ import annotations

import string

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "VOCAB_WORDS", "build_tokenizer"]

# order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
_WORD_START = "\u2581"  # sentencepiece's "▁"

# Vicuna v1 system line + roles, CoIN's instruction lines (Original style), the synthetic benchmark's words.
# Add words here freely: it only shortens sequences. tests/test_synthetic.py checks every word the
# generator writes is one token.
VOCAB_WORDS = tuple(sorted(set("""
A chat between a curious human and an artificial intelligence assistant The assistant gives helpful
detailed and polite answers to the human's questions USER ASSISTANT
Answer answer the question using single word or phrase with option option's letter from given choices directly
What what is object in image When provided information insufficient respond Unanswerable
Please please provide bounding box coordinate of region this sentence describes
Question Context Options Choose choose one Select select correct best Which which
red green blue yellow purple orange white gray black brown pink cyan
circle square triangle diamond cross star ring bar shape shapes object objects
circles squares triangles diamonds crosses stars rings bars
color colour size big small large tiny left right top bottom above below middle center
there are Are Is How how many number written on sign text say says word words
yes no Yes No zero one two three four five six seven eight nine ten
of to at side next same different than more fewer both
book cover title genre author Who who wrote this What's
apple ball house tree car fish flag key cup boat moon sun
novel poetry history science cooking travel comedy mystery
digit digits letter letters shown picture photo dark blurry
any some bus cab gym inn pub zoo exit open park sale stop taxi city dawn echo gold moon rain star wolf
""".split())))


def build_tokenizer(
    special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
    *,
    extra_words: tuple[str, ...] = (),
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    image_token: str = "<image>",
    extra_special: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """The deterministic tokenizer. By default LLaVA's: special tokens <s>, </s>, <unk>, <pad>, <image>, and
    encoding adds <s>. Another family passes its own special tokens (the first must be "<unk>"), words of its
    chat template (`extra_words`, after VOCAB_WORDS so the default ids never move) and roles; `bos=None` adds
    no start token."""
    if special_tokens[0] != "<unk>":
        raise ValueError(f"the first special token must be <unk> (the Unigram model's unk id 0), got {special_tokens[0]!r}")
    chars = [c for c in string.printable if c not in " \t\r\x0b\x0c"]  # letters, digits, punctuation, "\n"
    pieces: list[tuple[str, float]] = [(t, 0.0) for t in special_tokens]
    pieces += [(f"<0x{b:02X}>", -20.0) for b in range(256)]  # byte fallback for non-ASCII text
    pieces.append((_WORD_START, -12.0))
    pieces += [(c, -10.0) for c in chars]
    pieces += [(_WORD_START + c, -10.0) for c in chars]
    seen = {p for p, _ in pieces}
    for word in (*VOCAB_WORDS, *extra_words):  # whole words win over spelling them out (-1 vs -10 per character)
        for piece in (word, _WORD_START + word):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -1.0))

    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_WORD_START, prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([
        decoders.ByteFallback(),
        decoders.Metaspace(replacement=_WORD_START, prepend_scheme="first", split=True),
    ])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, special_tokens.index(bos))]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>",
        pad_token=pad,
        extra_special_tokens={"image_token": image_token, **(extra_special or {})},
        padding_side="right",
        model_max_length=4096,
    )
    return fast
