"""Tiny, randomly initialised VLMs of each supported architecture, built offline from configs.

They exercise exactly the code path of a real checkpoint: ``build_tiny(...)`` saves config,
weights, tokenizer and processor with ``save_pretrained`` and ``load_model(path)`` loads them
back. Used by the tests, the benchmarks and as the skeleton of the model organism.

The tokenizer is word level (``tokenizers.WordLevel``) over a small vocabulary, so nothing is
downloaded. ``initializer_range`` defaults to 0.2: with the usual 0.02 attention is nearly
uniform and an attention temperature barely moves the logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..errors import VislensError

#: words every tiny tokenizer knows (questions, answers, chat roles).
BASE_WORDS = (
    "user assistant system where is are the a an of in to relation photo answer with or and "
    "left right on under top bottom above below front behind yes no determine whether "
    "description about spatial relationship correct not one word phrase image"
).split()
PUNCT = list(".,?:!;'\"()-_/")

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def word_tokenizer(words: Iterable[str], special: list[str], *, bos: str | None, eos: str,
                   pad: str, unk: str = "<unk>", extra_special: dict[str, str] | None = None):
    """A word-level ``PreTrainedTokenizerFast``: whitespace/punctuation split, cased words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in [unk, *special]:
        vocab.setdefault(tok, len(vocab))
    for w in list(words) + PUNCT:
        # an ordered dedup, not a set: token ids must not depend on PYTHONHASHSEED
        for form in dict.fromkeys((w, w.lower(), w.capitalize(), w.upper())):
            vocab.setdefault(form, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    kwargs = dict(tokenizer_object=tok, unk_token=unk, eos_token=eos, pad_token=pad,
                  padding_side="left")
    if bos is not None:
        kwargs["bos_token"] = bos
    if extra_special:
        kwargs["extra_special_tokens"] = extra_special
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast


def llama_text_config(vocab_size: int, pad_id: int, bos_id, eos_id, *, hidden: int,
                      layers: int, heads: int, kv_heads: int, init: float, **extra):
    """A small Llama text config (MLP 2 x hidden, RoPE); shared by the tiny models and the organism."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       initializer_range=init, pad_token_id=pad_id, bos_token_id=bos_id,
                       eos_token_id=eos_id, rms_norm_eps=1e-5, **extra)


def clip_vision_config(image_size: int, patch: int, hidden: int, init: float):
    """A small CLIP vision config (2 layers, 2 heads; callers may change them)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, image_size=image_size, patch_size=patch,
                            projection_dim=hidden, initializer_range=init)


def build_tiny(arch: str, out_dir: str | Path, *, words: Iterable[str] = (), hidden: int = 64,
               layers: int = 3, heads: int = 4, kv_heads: int = 2, init: float = 0.2,
               image_size: int = 48, patch: int = 2, seed: int = 0) -> Path:
    """Build a tiny ``arch`` model (llava, llava_next, qwen2_vl, qwen2_5_vl) and save it.

    LLaVA defaults give a 24x24 patch grid (576 image tokens) like LLaVA-1.5. Returns the
    directory, loadable with :func:`vislens.models.load_model`.
    """
    import torch

    builders = {"llava": _build_llava, "llava_next": _build_llava_next,
                "qwen2_vl": _build_qwen, "qwen2_5_vl": _build_qwen}
    if arch not in builders:
        raise VislensError(f"unknown tiny architecture {arch!r}; choose one of {sorted(builders)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    words = list(BASE_WORDS) + [w for w in words if w]
    model, processor = builders[arch](arch, words, hidden=hidden, layers=layers, heads=heads,
                                      kv_heads=kv_heads, init=init, image_size=image_size,
                                      patch=patch)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def llava_tokenizer(words: Iterable[str]):
    """A word-level LLaVA tokenizer (``<image>`` token, USER/ASSISTANT roles, left padding)."""
    return word_tokenizer(list(words), ["<s>", "</s>", "<pad>", "<image>", "USER", "ASSISTANT"],
                          bos="<s>", eos="</s>", pad="<pad>",
                          extra_special={"image_token": "<image>"})


def qwen_tokenizer(words: Iterable[str]):
    """A word-level Qwen2-VL tokenizer (vision start/end, image and video pad tokens)."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    return word_tokenizer(list(words) + ["user", "assistant", "system"], special, bos=None,
                          eos="<|im_end|>", pad="<|endoftext|>",
                          extra_special={"image_token": "<|image_pad|>",
                                         "video_token": "<|video_pad|>",
                                         "vision_bos_token": "<|vision_start|>",
                                         "vision_eos_token": "<|vision_end|>"})


def _llava_parts(words, *, hidden, layers, heads, kv_heads, init, image_size, patch):
    tok = llava_tokenizer(words)
    ids = tok.convert_tokens_to_ids
    text = llama_text_config(len(tok), ids("<pad>"), ids("<s>"), ids("</s>"), hidden=hidden,
                       layers=layers, heads=heads, kv_heads=kv_heads, init=init)
    vision = clip_vision_config(image_size, patch, hidden // 2, init)
    return tok, text, vision, ids("<image>")


def _build_llava(arch, words, **kw):
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tok, text, vision, image_id = _llava_parts(words, **kw)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(kw["image_size"] // kw["patch"]) ** 2)
    model = LlavaForConditionalGeneration._from_config(cfg)
    ip = CLIPImageProcessor(size={"shortest_edge": kw["image_size"]},
                            crop_size={"height": kw["image_size"], "width": kw["image_size"]})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=kw["patch"],
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                          num_additional_image_tokens=1)
    return model, proc


def _build_llava_next(arch, words, **kw):
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    tok, text, vision, image_id = _llava_parts(words, **kw)
    s = kw["image_size"]
    pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=pinpoints)
    model = LlavaNextForConditionalGeneration._from_config(cfg)
    ip = LlavaNextImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                 image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=kw["patch"],
                              vision_feature_select_strategy="default",
                              chat_template=LLAVA_TEMPLATE, num_additional_image_tokens=1)
    return model, proc


def _build_qwen(arch, words, *, hidden, layers, heads, kv_heads, init, image_size, patch):
    from transformers import Qwen2VLImageProcessor

    tok = qwen_tokenizer(words)
    ids = tok.convert_tokens_to_ids
    head_dim = hidden // heads
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=4096, initializer_range=init, bos_token_id=None,
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                rope_scaling={"type": "mrope", "mrope_section": mrope_section(head_dim)},
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": mrope_section(head_dim)})
    ip = Qwen2VLImageProcessor(patch_size=patch * 7, merge_size=2, temporal_patch_size=2,
                               min_pixels=(8 * patch * 7) ** 2, max_pixels=(12 * patch * 7) ** 2)
    common = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"))
    if arch == "qwen2_vl":
        from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                                  Qwen2VLProcessor)

        vision = dict(depth=2, embed_dim=hidden // 2, hidden_size=hidden, num_heads=2,
                      patch_size=patch * 7, spatial_merge_size=2, temporal_patch_size=2,
                      mlp_ratio=2, in_channels=3, initializer_range=init)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **common)
        model = Qwen2VLForConditionalGeneration._from_config(cfg)
        proc_cls = Qwen2VLProcessor
    else:
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                                  Qwen2_5_VLProcessor)

        vision = dict(depth=2, hidden_size=hidden // 2, out_hidden_size=hidden, num_heads=2,
                      intermediate_size=hidden, patch_size=patch * 7, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=patch * 7 * 4, fullatt_block_indexes=[1],
                      in_channels=3, initializer_range=init)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
        proc_cls = Qwen2_5_VLProcessor
    proc = qwen_processor(proc_cls, ip, tok)
    return model, proc


def qwen_processor(proc_cls, ip, tok):
    """A Qwen2(.5)-VL processor from parts; works with and without torchvision."""
    try:
        return proc_cls(image_processor=ip, tokenizer=tok, video_processor=None,
                        chat_template=QWEN_TEMPLATE)
    except (AttributeError, TypeError, ValueError):
        from transformers import Qwen2VLVideoProcessor

        return proc_cls(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                        chat_template=QWEN_TEMPLATE)


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL M-RoPE split of head_dim/2 rotary pairs into (time, height, width) sections."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]
