"""The model adapter interface: prompts, batching, positions and image layouts per family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import VislensError
from ..registry import Registry
from .layout import ImageLayout


@dataclass
class PreparedBatch:
    """A left-padded batch ready for the decoding engine.

    ``position_ids`` is ``[B, n]`` (Llama-style) or ``[3, B, n]`` (Qwen2-VL M-RoPE);
    ``image_keys`` [B, n] marks image-token positions; ``vision`` holds the pixel inputs.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    image_keys: torch.Tensor
    vision: dict[str, Any]
    layouts: list[ImageLayout]
    prompts: list[str]

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


class VLMAdapter:
    """Wraps a transformers VLM and its processor with what vislens needs to know.

    Subclasses implement :meth:`layouts`; most also override :meth:`position_ids`.
    """

    family: ClassVar[str] = "base"
    default_template: ClassVar[str] = "USER: <image>\n{question} ASSISTANT:"
    #: processor outputs used only to compute positions, not passed to the model
    position_only_keys: ClassVar[tuple[str, ...]] = ("mm_token_type_ids",)

    def __init__(self, model: torch.nn.Module, processor: Any, name: str,
                 revision: str | None = None) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self.name = name
        self.revision = revision or ""
        self.config = model.config
        self.text_config = getattr(model.config, "text_config", model.config)
        self.image_token_id = int(model.config.image_token_id)
        self._prompt_ending: str | None = None
        self._option_ids: dict[tuple[str, tuple[str, ...]], list[list[int]]] = {}

    # -- facts --------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def tied_embeddings(self) -> bool:
        """Whether the LM head shares its weight with the input embedding (read from the
        loaded weights, not the config, whose flag a wrapper config may not mirror)."""
        out, emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if out is None or emb is None:
            return False
        return out.weight.data_ptr() == emb.weight.data_ptr()

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.text_config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is not None:
                ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def final_norm(self) -> torch.nn.Module:
        """The language model's final norm (applied before the LM head), for early exits."""
        lm = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        for cand in (lm, getattr(getattr(self.model, "model", None), "language_model", None)):
            if cand is not None and hasattr(cand, "norm"):
                return cand.norm
        raise VislensError(f"{self.name}: cannot find the language model's final norm")

    # -- prompts ------------------------------------------------------------------------
    def format_prompt(self, question: str) -> str:
        """The model's chat template around ``question`` with one image, generation prompt on.

        A ``question`` that already contains the image token is taken as a complete prompt.
        """
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        if image_token in question:
            return question
        if getattr(self.processor, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True,
                                                      tokenize=False)
        return self.default_template.format(question=question)

    def answer_prefix(self) -> str:
        """Text between the prompt's end and the answer (a space for 'ASSISTANT: Left')."""
        return " "

    def prompt_ending(self) -> str:
        """The text the model's prompt ends with after the question (``" ASSISTANT:"`` for
        LLaVA-1.5, ``"<|im_end|>\\n<|im_start|>assistant\\n"`` for Qwen2-VL): the answer follows it."""
        if self._prompt_ending is None:
            marker = "VislensQuestionMarker"
            prompt = self.format_prompt(marker)
            if marker not in prompt:
                raise VislensError(f"{self.name}: the chat template drops the question; "
                                   "cannot tell where the answer starts")
            self._prompt_ending = prompt.rsplit(marker, 1)[1]
        return self._prompt_ending

    def option_token_ids(self, options: Sequence[str], prompt: str | None = None) -> list[list[int]]:
        """For each option, the distinct first tokens the model generates to start it as an answer.

        That token is the first one where the tokenisation of the prompt's end +
        :meth:`answer_prefix` + option departs from the tokenisation of the prompt's end
        alone: the token right after the prompt's last one. Tokenising the option alone is
        not enough: a legacy sentencepiece Llama tokenizer encodes ``" Left"`` as
        ``['▁', '▁Left']`` and ``" "`` as ``['▁▁']``, while after ``"ASSISTANT:"`` the model
        generates ``'▁Left'``. ``prompt`` (a full prompt) decides the prompt's end when it
        does not end with the model's template (:meth:`prompt_ending`); its text after the
        last image token is used then. Case variants ("Left", "left") are both counted: a
        model may answer in either. Results are cached per (prompt end, options).
        """
        ending = self._ending_of(prompt)
        key = (ending, tuple(options))
        if key not in self._option_ids:
            if len(self._option_ids) >= 4096:
                self._option_ids.clear()
            self._option_ids[key] = self._first_tokens(ending, options)
        return [list(ids) for ids in self._option_ids[key]]

    def _ending_of(self, prompt: str | None) -> str:
        ending = self.prompt_ending()
        if prompt is None or prompt.endswith(ending):
            return ending
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return prompt.rsplit(image_token, 1)[-1]

    def _first_tokens(self, ending: str, options: Sequence[str]) -> list[list[int]]:
        def encode(text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        base = encode(ending)
        out = []
        for opt in options:
            if not opt.strip():
                raise VislensError(f"{self.name}: an answer option is empty ({opt!r})")
            ids: list[int] = []
            for form in dict.fromkeys([opt, opt.lower(), opt.capitalize()]):
                toks = encode(ending + self.answer_prefix() + form)
                k = next((j for j, (a, b) in enumerate(zip(base, toks)) if a != b),
                         min(len(base), len(toks)))
                if k < len(base):
                    raise VislensError(f"{self.name}: option {form!r} cannot be scored: the "
                                       f"tokenizer merges it into the prompt's end {ending[-20:]!r}")
                if k < len(toks) and int(toks[k]) not in ids:
                    ids.append(int(toks[k]))
            if not ids:
                raise VislensError(f"{self.name}: option {opt!r} adds no token after the prompt")
            out.append(ids)
        return out

    # -- batches ------------------------------------------------------------------------
    def prepare(self, images: Sequence[Any], questions: Sequence[str], *,
                raw_prompts: bool = False) -> PreparedBatch:
        """Tokenise a batch (left padding), locate image tokens, compute positions.

        ``questions`` are wrapped in the model's chat template unless ``raw_prompts``, in
        which case they must already hold the image token where the image goes.
        """
        if len(images) != len(questions):
            raise VislensError(f"{len(images)} images but {len(questions)} questions")
        prompts = list(questions) if raw_prompts else [self.format_prompt(q) for q in questions]
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        for i, p in enumerate(prompts):
            if image_token not in p:
                raise VislensError(f"prompt {i} has no image token {image_token!r}: {p[:60]!r}")
        try:
            enc = self.processor(images=list(images), text=prompts, return_tensors="pt",
                                 padding=True)
        except (ValueError, TypeError) as exc:
            raise VislensError(f"{self.name}: the processor rejected the batch: "
                               f"{str(exc).splitlines()[0]}") from None
        ids = enc["input_ids"]
        image_keys = ids == self.image_token_id
        for i, p in enumerate(prompts):
            if not bool(image_keys[i].any()):
                raise VislensError(f"prompt {i} has no image token after processing: {p[:80]!r}")
            if bool(image_keys[i, -1]):
                raise VislensError(f"prompt {i} ends with an image token; the answer position "
                                   "must be a text token")
        attention_mask = enc["attention_mask"]
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        position_ids = self.position_ids(ids, attention_mask, vision)
        layouts = self.layouts(ids, image_keys, vision, [im.size for im in images])
        for key in self.position_only_keys:  # explicit positions make these unnecessary
            vision.pop(key, None)
        dev = self.device
        vision = {k: (v.to(dev, self.dtype) if torch.is_floating_point(v) else v.to(dev))
                  if torch.is_tensor(v) else v for k, v in vision.items()}
        return PreparedBatch(ids.to(dev), attention_mask.to(dev), position_ids.to(dev),
                             image_keys.to(dev), vision, layouts, prompts)

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     vision: dict[str, Any]) -> torch.Tensor:
        """Llama-style positions that skip left padding, as ``generate`` computes them."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)

    def next_position(self, position_ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Positions of the ``steps``-th generated token (0 = first), shaped like one column."""
        return position_ids.amax(dim=-1, keepdim=True) + 1 + steps

    def layouts(self, input_ids: torch.Tensor, image_keys: torch.Tensor,
                vision: dict[str, Any], sizes: list[tuple[int, int]]) -> list[ImageLayout]:
        raise NotImplementedError

    def image_view(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The rectangle of an original ``size = (W, H)`` image the model sees, normalised
        ``(x0, y0, x1, y1)`` (the bounding box of :meth:`layouts`' token rectangles).

        The whole image here, as for every family that resizes without cropping (NeXT's base
        grid, Qwen2-VL); LLaVA-1.5 overrides it with its processor's centre crop. The capture
        stores it per sample (``samples/view``) so box masks count only what the model saw.
        """
        return (0.0, 0.0, 1.0, 1.0)

    @staticmethod
    def _positions(image_keys: torch.Tensor, i: int) -> np.ndarray:
        return torch.nonzero(image_keys[i]).flatten().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "family": self.family, "model_revision": self.revision,
                "num_layers": self.num_layers, "num_heads": self.num_heads,
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}


class AdapterEntry(NamedTuple):
    """How to load one model family: its adapter and the transformers model class name."""

    adapter: type[VLMAdapter]
    model_class: str


#: supported model families, keyed by the checkpoint config's ``model_type``
ADAPTER_REGISTRY: Registry[AdapterEntry] = Registry("model family")


def register_adapter(model_type: str, model_class: str) -> Callable[[type[VLMAdapter]], type[VLMAdapter]]:
    """Class decorator: ``model_type`` checkpoints load as ``transformers.<model_class>``
    wrapped in the decorated adapter (one family, one file)."""
    def deco(cls: type[VLMAdapter]) -> type[VLMAdapter]:
        ADAPTER_REGISTRY.add(model_type, AdapterEntry(cls, model_class))
        return cls

    return deco
