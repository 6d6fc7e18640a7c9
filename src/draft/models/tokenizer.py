"""A CLIP BPE tokenizer over a small word list, each word one token.

The embedded `shapes-sd` model and the tests' tiny pipelines and reward models need a real
`CLIPTokenizer` (the class every Stable Diffusion pipeline loads) without downloading
CLIP's 49k-token vocabulary. CLIP's BPE merges a word's characters pair by pair in the
order of the merge list; writing, word by word, the merges that the earlier ones leave
missing makes every listed word a single token, and adding a word never changes how an
earlier one splits. Other text still tokenizes, character by character.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _segment(word: str, ranks: dict[tuple[str, str], int], suffix: str = "</w>") -> list[str]:
    """The pieces a BPE splits `word` into under the merges ranked so far (CLIP marks a
    word's last character with "</w>"; byte-level BPEs mark nothing)."""
    pieces = list(word[:-1]) + [word[-1] + suffix]
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def word_tokenizer(
    folder: str | Path, words: Iterable[str], max_length: int = 77, extra_chars: str = "", specials_first: bool = False
):
    """Write vocab.json and merges.txt for `words` into `folder`; return the CLIPTokenizer.

    `extra_chars` adds single characters (e.g. punctuation) so text beyond the word list
    tokenizes without unknown tokens. The start and end tokens get the highest ids, as in
    CLIP, where some text models find the end of a prompt as the argmax of the ids;
    `specials_first` gives them ids 0 and 1 instead (the layout shapes-sd was built with).
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = list(dict.fromkeys(words))
    vocab: dict[str, int] = {BOS: 0, EOS: 1} if specials_first else {}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for ch in [c for w in words for c in w] + list(extra_chars):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    for word in words:
        while len(pieces := _segment(word, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                              pad_token=EOS)
    for word in words:  # the property callers rely on
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    return tokenizer


def t5_word_tokenizer(words: Iterable[str], max_length: int = 32):
    """A T5 tokenizer (SentencePiece-style unigram, built with the `tokenizers` library) in
    which every listed word is one token and other text falls back to characters.

    For tiny SD3 and FLUX pipelines, whose third/second text encoder is a T5, without
    downloading T5's 32k-piece vocabulary. `save_pretrained` writes a tokenizer.json that
    `T5TokenizerFast.from_pretrained` (and the pipelines' loaders) read back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = list(dict.fromkeys(words))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    # Whole words are far likelier than their spellings, so the unigram model keeps them whole.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


# The chat-template markers Qwen's tokenizers add as special tokens (Qwen-Image wraps each
# prompt in a chat template) and the vision markers Qwen2.5-VL's config names by id.
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>")


def qwen_word_tokenizer(words: Iterable[str], max_length: int = 1024):
    """A `Qwen2Tokenizer` (byte-level BPE, built with the `tokenizers` library) in which every
    listed word, alone or after a space, is one token and other text falls back to bytes.

    For tiny Qwen-Image pipelines, without downloading Qwen's 151k-token vocabulary. The
    vocabulary starts with the 256 byte symbols, so any text tokenizes; the merges are
    written word by word as in `word_tokenizer`. `save_pretrained` writes a tokenizer.json
    that the pipeline's loader reads back.
    """
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    space = pre_tokenizers.ByteLevel.alphabet()  # GPT-2's byte-to-symbol table: " " is "Ġ"
    vocab = {c: i for i, c in enumerate(sorted(space))}
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w for word in words for w in (word, "\u0120" + word)):
        while len(pieces := _segment(word, ranks, suffix="")) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    for token in QWEN_SPECIALS:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in QWEN_SPECIALS])
    return tokenizer
