"""A Llama-like (legacy sentencepiece-style) tokenizer and a tiny LLaVA built on it, offline.

LLaVA-1.5's ``tokenizer.json`` normalises text by prepending ``'▁'`` and replacing spaces
with ``'▁'``, then runs BPE over the whole string; the ``'▁' + '▁'`` merge ranks last. So
``" Left"`` becomes ``'▁▁Left'`` and encodes as ``['▁', '▁Left']`` while ``" "`` encodes as
``['▁▁']``: tokenising an answer on its own does not give the token a model generates after
``"ASSISTANT:"`` (``'▁Left'``). This module reproduces that pipeline with a small vocabulary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = ["USER", "ASSISTANT", "Where", "is", "the", "ball", "It", "Left", "left", "Right",
         "right", "On", "on", "Under", "under"]


def llama_like_tokenizer(words: Iterable[str] = WORDS,
                         extra_merges: Sequence[tuple[str, str]] = ()):
    """A ``PreTrainedTokenizerFast`` with the legacy Llama pipeline over ``'▁' + word`` pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    words = list(words)
    vocab: dict[str, int] = {}
    for t in SPECIAL + sorted({c for w in words for c in w} | set("▁\n?:")):
        vocab.setdefault(t, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:  # '▁' + w built left to right
        cur = "▁"
        for c in w:
            merges.append((cur, c))
            cur += c
            vocab.setdefault(cur, len(vocab))
    merges = list(dict.fromkeys(merges)) + list(extra_merges) + [("▁", "▁")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def llava_processor(tokenizer, image_size: int = 48, patch: int = 4):
    """A LLaVA-1.5 processor (CLIP crop, LLaVA chat template) around ``tokenizer``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vislens.models.tiny import LLAVA_TEMPLATE

    ip = CLIPImageProcessor(size={"shortest_edge": image_size},
                            crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                          num_additional_image_tokens=1)


def build_llama_like_llava(out_dir: Path, image_size: int = 48, patch: int = 4) -> Path:
    """A tiny random LLaVA-1.5 with :func:`llama_like_tokenizer`, saved for ``load_model``."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vislens.models.tiny import clip_vision_config, llama_text_config

    torch.manual_seed(0)
    proc = llava_processor(llama_like_tokenizer(), image_size, patch)
    tok = proc.tokenizer
    ids = tok.convert_tokens_to_ids
    text = llama_text_config(len(tok), ids("<pad>"), ids("<s>"), ids("</s>"), hidden=32, layers=2,
                             heads=4, kv_heads=2, init=0.2)
    cfg = LlavaConfig(vision_config=clip_vision_config(image_size, patch, 16, 0.2),
                      text_config=text, image_token_id=ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default",
                      image_seq_length=(image_size // patch) ** 2)
    LlavaForConditionalGeneration._from_config(cfg).save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return Path(out_dir)
