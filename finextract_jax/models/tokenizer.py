"""A small CLIP BPE tokenizer built offline, for tiny test and demo pipelines.

Real SD tokenizers (49,408 tokens) come with real checkpoints; a tiny pipeline needs a vocabulary
small enough that its embedding table stays tiny, yet one CLIPTokenizer (ours and diffusers
PyTorch's) reads unchanged. The vocabulary is every byte symbol (alone and word-final), the
special tokens, and the merges that spell a fixed list of whole words, so each listed word is
one token (which caption recovery relies on) and any other text still tokenizes, byte by byte.
"""
from __future__ import annotations

import json
import os

WORDS = """
a an the of in on at with and or by for to from is it this that photo photograph picture image painting
drawing sketch art style artwork portrait landscape of dog cat bird horse cow sheep fish flower tree trees
house building city street road river lake sea ocean mountain mountains sky cloud clouds sun moon star
night day morning evening snow rain forest field garden park beach desert bridge tower castle church
boat car train bicycle person man woman child girl boy face eyes hair hand people crowd coffee cup
teapot rocket astronaut camera brick grass gravel stone wall rock sand water fire light dark red green
blue yellow black white brown orange purple pink gray grey gold silver old new small large big little
tall short bright colorful beautiful vintage modern abstract realistic detailed close up view high
quality monet impressionism claude vincent van gogh picasso cubism renaissance baroque oil watercolor
ink pencil charcoal sks toy backpack sneaker vase clock teddy bear sunglasses hat candle bowl plate
chair table window door statue sculpture texture pattern stripes dots checkerboard noise gradient
""".split()


def _bytes_to_unicode():
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    return bytes_to_unicode()


def build_vocab(words=WORDS):
    """Vocabulary dict and merge list for a byte-level CLIP BPE that spells `words` whole."""
    symbols = list(_bytes_to_unicode().values())
    vocab = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges = []
    for word in dict.fromkeys(words):
        # Add merges until the BPE (lowest rank first) spells the word as one token.
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_bpe(pieces, merges)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def _apply_bpe(pieces, merges):
    ranks = {m: i for i, m in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def write_tokenizer(out_dir: str, words=WORDS, pad_token: str = "<|endoftext|>"):
    """Write vocab.json, merges.txt and the tokenizer config; returns the vocabulary size.

    pad_token: CLIP pads with the end token; SDXL's second (OpenCLIP) tokenizer pads with "!".
    """
    os.makedirs(out_dir, exist_ok=True)
    vocab, merges = build_vocab(words)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": pad_token, "errors": "replace", "clean_up_tokenization_spaces": True,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    return len(vocab)
