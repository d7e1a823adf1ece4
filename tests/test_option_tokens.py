"""An answer option's first token is the one the model generates right after the prompt.

Checked against hand-picked token ids and against the softmax of a plain forward pass, on a
Llama-like tokenizer with the legacy sentencepiece quirk (``" Left"`` -> ``['▁', '▁Left']``)
and on the word-level tiny models of every family.
"""
from __future__ import annotations

import pytest
import torch

from conftest import ARCHS, random_image
from eager_reference import assert_close
from llama_like import build_llama_like_llava, llama_like_tokenizer, llava_processor
from vislens.decoding import run_conditions
from vislens.errors import VislensError
from vislens.models import load_model

QUESTIONS = ["Where is the ball?", "Where is it?"]


@pytest.fixture(scope="module")
def llama_llava(tmp_path_factory):
    return load_model(build_llama_like_llava(tmp_path_factory.mktemp("llama-like")),
                      dtype="float32", device="cpu")


def pieces(tok, text):
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_the_llama_like_tokenizer_has_the_legacy_quirk(llama_llava):
    tok = llama_llava.tokenizer  # as loaded back from disk, the way users get it
    assert pieces(tok, " Left") == ["▁", "▁Left"]
    assert pieces(tok, " ") == ["▁▁"]
    prompt = llama_llava.format_prompt(QUESTIONS[0])
    assert pieces(tok, prompt)[-2:] == ["▁ASSISTANT", ":"]
    assert pieces(tok, prompt + " Left")[-3:] == ["▁ASSISTANT", ":", "▁Left"]


def test_options_start_with_the_token_generated_after_the_prompt(llama_llava):
    ids = llama_llava.tokenizer.convert_tokens_to_ids
    got = llama_llava.option_token_ids(["Left", "right"])
    assert got == [[ids("▁Left"), ids("▁left")], [ids("▁right"), ids("▁Right")]]
    assert ids("▁") not in sum(got, [])  # the old answer: a lone space piece for every option
    assert llama_llava.prompt_ending() == " ASSISTANT:"


def test_a_prompt_off_the_template_uses_its_own_end(llama_llava):
    ids = llama_llava.tokenizer.convert_tokens_to_ids
    raw = "USER: <image>\nWhere is the ball? ASSISTANT: It is"
    assert llama_llava.option_token_ids(["Left"], raw) == [[ids("▁Left"), ids("▁left")]]
    templ = llama_llava.format_prompt(QUESTIONS[1])
    assert llama_llava.option_token_ids(["On"], templ) == [[ids("▁On"), ids("▁on")]]


def test_unscorable_options_are_refused(llama_llava):
    with pytest.raises(VislensError, match="an answer option is empty"):
        llama_llava.option_token_ids(["Left", ""])
    # a tokenizer that fuses ':' with the answer: its first token would hold prompt text
    proc = llava_processor(llama_like_tokenizer(extra_merges=[(":", "▁Left")]))
    fused = type(llama_llava)(llama_llava.model, proc, "fused")
    assert pieces(proc.tokenizer, "ASSISTANT: Left")[-1] == ":▁Left"
    with pytest.raises(VislensError, match=r"option 'Left' cannot be scored: .*merges"):
        fused.option_token_ids(["Left"])


@pytest.mark.parametrize("arch", ARCHS)
def test_word_level_tiny_models_keep_their_ids(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    ids = adapter.tokenizer.convert_tokens_to_ids
    assert adapter.option_token_ids(["Left", "Right", "on"]) == [
        [ids("Left"), ids("left")], [ids("Right"), ids("right")], [ids("on"), ids("On")]]


def plain_first_probs(adapter, image, question) -> torch.Tensor:
    """Softmax of a plain, unpadded forward pass's last logits (no vislens decoding)."""
    enc = adapter.processor(images=[image], text=[adapter.format_prompt(question)],
                            return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(adapter.model(**enc).logits[0, -1].double(), -1)


def check_option_probs(adapter, token_of):
    images = [random_image(1), random_image(2, size=(44, 52))]
    options = [["Left", "Right"], ["under", "on"]]
    res = run_conditions(adapter, images, QUESTIONS, options, ["baseline"], max_new_tokens=2)
    for img, q, opts, r in zip(images, QUESTIONS, options, res):
        p = plain_first_probs(adapter, img, q)
        ids = adapter.tokenizer.convert_tokens_to_ids
        want = [float(p[ids(token_of(o.lower()))] + p[ids(token_of(o.capitalize()))])
                for o in opts]
        assert_close(r["baseline"].option_probs, want)


def test_option_probs_of_a_llama_like_model(llama_llava):
    check_option_probs(llama_llava, lambda w: "▁" + w)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_option_probs_of_word_level_models(tiny_adapter, arch):
    check_option_probs(tiny_adapter(arch), lambda w: w)


def test_one_option_list_per_sample(tiny_adapter):
    with pytest.raises(VislensError, match="2 samples but 1 option lists"):
        run_conditions(tiny_adapter("llava"), [random_image(1), random_image(2)], QUESTIONS,
                       [["Left", "Right"]], ["baseline"], max_new_tokens=1)
