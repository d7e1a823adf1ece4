"""load_model on tiny checkpoints of every family, image layouts, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ARCHS, random_image
from vislens.errors import VislensError
from vislens.models import load_model, model_dims
from vislens.models.layout import area_projection, grid_rects
from vislens.models.llava import clip_view

Q = "Where is the ball in relation to the box? Answer with left, right, on or under."


@pytest.mark.parametrize("arch", ARCHS)
def test_load_model_by_path_picks_the_family(tiny_dir, arch):
    adapter = load_model(tiny_dir(arch), dtype="float32", device="cpu")
    expect = {"qwen2_5_vl": "qwen2_vl"}.get(arch, arch)
    assert adapter.family == expect
    assert adapter.model.config.text_config._attn_implementation == "vislens"
    assert adapter.model.config.vision_config._attn_implementation != "vislens"
    assert adapter.dtype == torch.float32 and adapter.device.type == "cpu"
    assert adapter.num_layers == 3 and adapter.num_heads == 4


def test_dtype_option(tiny_dir):
    adapter = load_model(tiny_dir("llava"), dtype="bfloat16", device="cpu")
    assert adapter.dtype == torch.bfloat16


def test_llava_layout_square_is_the_patch_grid(tiny_adapter):
    adapter = tiny_adapter("llava")
    batch = adapter.prepare([random_image(0, (48, 48))], [Q])
    lay = batch.layouts[0]
    assert lay.num_tokens == 576
    pos = lay.positions
    assert np.array_equal(pos, np.arange(pos[0], pos[0] + 576))  # contiguous
    assert np.array_equal(np.nonzero(batch.image_keys[0].numpy())[0], pos)
    np.testing.assert_allclose(lay.projection(24), np.eye(576), atol=1e-12)
    # a coarser grid sums 2x2 patches
    v = np.arange(576, dtype=float)
    g12 = lay.to_grid(v, 12)
    assert g12[0, 0] == pytest.approx(v[0] + v[1] + v[24] + v[25])


def test_center_crop_geometry_hand_computed():
    class IP:  # CLIP-style: shortest edge 48, center crop 48
        size = {"shortest_edge": 48}
        crop_size = {"height": 48, "width": 48}
        do_center_crop = True
        do_resize = True

    # 120 x 60 image -> resized 96 x 48 -> central 48 px = x in [24, 72] of 96 -> [0.25, 0.75]
    assert clip_view(120, 60, IP()) == pytest.approx((0.25, 0.0, 0.75, 1.0))
    assert clip_view(50, 50, IP()) == pytest.approx((0.0, 0.0, 1.0, 1.0))


def test_llava_layout_wide_image_sees_only_the_center(tiny_adapter):
    adapter = tiny_adapter("llava")
    lay = adapter.prepare([random_image(1, (96, 48))], [Q]).layouts[0]
    vis = lay.visible(24)
    assert vis[:, :6].max() == 0 and vis[:, -6:].max() == 0 and vis[:, 6:18].min() == pytest.approx(1)
    # token (0, 0) covers x in [0.25, 0.25 + 0.5/24], y in [0, 1/24]
    np.testing.assert_allclose(lay.rects[0], [0.25, 0, 0.25 + 0.5 / 24, 1 / 24])


def test_area_projection_hand_computed():
    rects = np.array([[0.0, 0.0, 0.5, 0.5],      # exactly cell (0, 0) of a 2x2 grid
                      [0.25, 0.25, 0.75, 0.75],  # a quarter in each cell
                      [np.nan] * 4])
    p = area_projection(rects, 2)
    np.testing.assert_allclose(p, [[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 0]])
    np.testing.assert_allclose(grid_rects(2, 3)[4], [1 / 3, 0.5, 2 / 3, 1.0])


def test_llava_next_layout(tiny_adapter):
    adapter = tiny_adapter("llava_next")
    img = random_image(2, (60, 40))
    batch = adapter.prepare([img], [Q])
    lay = batch.layouts[0]
    assert lay.num_tokens == int(batch.image_keys[0].sum())
    kinds = lay.kinds
    assert (kinds[:576] == "base").all()  # base grid first
    tiles = kinds == "tile"
    newline = kinds == "newline"
    assert newline.sum() > 0 and not np.isnan(lay.rects[tiles]).any() and np.isnan(lay.rects[newline]).all()
    # a newline ends every canvas row: the token before each newline is a tile token
    idx = np.nonzero(newline)[0]
    assert (kinds[idx - 1] == "tile").all() and kinds[-1] == "newline"
    # base tokens tile the whole image once; tile tokens cover it once more (unpadded canvas)
    area = lambda r: ((r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])).sum()
    assert area(lay.rects[kinds == "base"]) == pytest.approx(1.0)
    assert area(lay.rects[tiles]) == pytest.approx(1.0, abs=0.05)
    # rows of tile tokens go left to right, top to bottom
    first_row = lay.rects[576:idx[0]]
    assert np.all(np.diff(first_row[:, 0]) > 0)
    grid = lay.to_grid(np.where(lay.spatial, 1.0, 0.0), 24)
    assert grid.sum() == pytest.approx(lay.spatial.sum())


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_layout(tiny_adapter, arch):
    adapter = tiny_adapter(arch)
    batch = adapter.prepare([random_image(3, (140, 112))], [Q])
    t, h, w = batch.vision["image_grid_thw"][0].tolist()
    lay = batch.layouts[0]
    assert lay.num_tokens == t * h * w // 4
    cols = w // 2
    k = cols + 1  # second merged row, second column
    np.testing.assert_allclose(lay.rects[k], [1 / cols, 2 / h, 2 / cols, 4 / h])
    assert batch.position_ids.shape[0] == 3


def test_unknown_architecture(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(VislensError, match="unsupported architecture 'LlamaForCausalLM'"):
        load_model(tmp_path / "llama")


def test_model_dir_without_weights(tmp_path, tiny_dir):
    src = tiny_dir("llava")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(VislensError, match="no weights"):
        load_model(tmp_path / "m")
    with pytest.raises(VislensError, match="no such model directory"):
        load_model(tmp_path / "missing" / "model")
    with pytest.raises(VislensError, match="unknown dtype"):
        load_model(src, dtype="float8")


def test_prompt_without_image_token(tiny_adapter):
    adapter = tiny_adapter("llava")
    with pytest.raises(VislensError, match="no image token"):
        adapter.prepare([random_image(4)], ["USER: where? ASSISTANT:"], raw_prompts=True)


def test_option_token_ids_and_chat_template(tiny_adapter):
    adapter = tiny_adapter("llava")
    prompt = adapter.format_prompt("Where is it?")
    assert prompt.startswith("USER: <image>\n") and prompt.endswith("ASSISTANT:")
    ids = adapter.option_token_ids(["Left", "Right"])
    tok = adapter.tokenizer
    assert tok.convert_ids_to_tokens(ids[0]) == ["Left", "left"]
    qwen = tiny_adapter("qwen2_vl")
    assert qwen.format_prompt("Where?").endswith("<|im_start|>assistant\n")


class _Marker:
    """Unpickling this object creates ``path`` (a booby-trapped weights file's payload)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_with_code_are_one_line(tmp_path, tiny_dir):
    import shutil

    src = tiny_dir("llava")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "PWNED"
    torch.save({"w": _Marker(marker)}, bad / "pytorch_model.bin")
    with pytest.raises(VislensError) as info:
        load_model(bad, dtype="float32", device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: refusing to load the weights")
    assert "GLOBAL io.open" in msg or "GLOBAL builtins.open" in msg
    assert not marker.exists()


def test_custom_code_in_a_model_folder_never_runs_nor_prompts(tmp_path, tiny_dir, monkeypatch):
    """A processor config naming code in the folder (``auto_map``) is refused in one line;
    transformers' interactive "run the custom code? [y/N]" prompt is never shown."""
    import builtins
    import json
    import shutil

    prompts = []
    monkeypatch.setattr(builtins, "input", lambda *a: prompts.append(a) or "y")
    marker = tmp_path / "PWNED"
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir("llava"), bad)
    (bad / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).mkdir()\n"
                                 "from transformers import LlavaProcessor\n"
                                 "class P(LlavaProcessor):\n    pass\n")
    cfg = bad / "processor_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "processor_class": "P",
                               "auto_map": {"AutoProcessor": "evil.P"}}))
    with pytest.raises(VislensError) as info:
        load_model(bad, dtype="float32", device="cpu")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{bad}: cannot load the processor") and \
        "custom code" in msg
    assert prompts == [] and not marker.exists()
    conf = bad / "config.json"  # an unknown model_type whose config class is custom code
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "model_type": "evil",
                                "auto_map": {"AutoConfig": "evil.C"}}))
    for call in (lambda: model_dims(bad), lambda: load_model(bad, device="cpu")):
        with pytest.raises(VislensError, match="cannot read the model config"):
            call()
    assert prompts == [] and not marker.exists()


@pytest.fixture
def network_log(monkeypatch):
    """Every DNS lookup / connect raises and is recorded."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_unknown_hub_id_offline_fails_at_once(network_log):
    from huggingface_hub import is_offline_mode

    assert is_offline_mode()  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(VislensError) as info:
        load_model("nobody/no-such-vlm", device="cpu")
    assert str(info.value) == ("nobody/no-such-vlm: no such model directory, and not in the local "
                               "hub cache (HF_HUB_OFFLINE is set, so nothing is downloaded)")
    assert network_log == []


def test_unknown_hub_id_online_without_network_asks_once(network_log, monkeypatch):
    """Online mode, hub unreachable: one lookup, then one line (transformers would retry for ~30 s)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(VislensError) as info:
        load_model("nobody/no-such-vlm", device="cpu")
    msg = str(info.value)
    assert msg.startswith("nobody/no-such-vlm: cannot reach the hub (") and "\n" not in msg
    assert msg.endswith("not in the local cache; download it first or give a local directory")
    assert 1 <= len(network_log) <= 2


def test_load_model_dispatches_through_the_adapter_registry(tiny_dir, monkeypatch):
    """A family is one registry entry: load_model uses whatever adapter is registered."""
    import vislens.models as vm
    from vislens.models.llava import LlavaAdapter
    from vislens.registry import Registry

    assert vm.ADAPTERS == ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl") == vm.ADAPTER_REGISTRY.names()

    class MyLlava(LlavaAdapter):
        family = "my-llava"

    registry = Registry("model family")
    for name, entry in vm.ADAPTER_REGISTRY.items():
        if name != "llava":
            registry.add(name, entry)
    monkeypatch.setattr(vm, "ADAPTER_REGISTRY", registry)
    with pytest.raises(VislensError, match=r"unsupported architecture 'LlavaForConditionalGeneration'; "
                                           r"vislens supports llava_next, qwen2_vl, qwen2_5_vl"):
        load_model(tiny_dir("llava"), dtype="float32", device="cpu")
    registry.add("llava", vm.AdapterEntry(MyLlava, "LlavaForConditionalGeneration"))
    adapter = load_model(tiny_dir("llava"), dtype="float32", device="cpu")
    assert type(adapter) is MyLlava and adapter.num_layers == 3


def _float_ramp(w: int, h: int) -> np.ndarray:
    """Float RGB image: red = normalised x, green = normalised y of each pixel centre, blue = 1."""
    im = np.ones((h, w, 3), np.float32)
    im[..., 0] = ((np.arange(w) + 0.5) / w)[None, :]
    im[..., 1] = ((np.arange(h) + 0.5) / h)[:, None]
    return im


def test_llava_next_tile_rects_follow_the_processors_integer_resize_and_paste(tiny_adapter):
    """Tile tokens see what the processor put on its canvas: a 500 x 377 image on the 96 x 96
    canvas is resized to 96 x ceil(377 * 96 / 500) = 73 rows pasted at y = (96 - 73) // 2 = 11
    (continuous arithmetic said 72.38 rows at 11.81: 0.4 of a tile token off)."""
    import copy

    adapter = tiny_adapter("llava_next")
    lay = adapter.prepare([random_image(4, (500, 377))], [Q]).layouts[0]
    tiles = lay.rects[lay.kinds == "tile"]
    # the model unpads the 48 x 48 feature canvas to rows 6..41 (int(377 * 48 / 500) = 36 rows);
    # feature row R covers canvas y in [2R, 2R + 2], i.e. original y = (2R - 11) / 73
    np.testing.assert_allclose(tiles[0], [0, 1 / 73, 1 / 48, 3 / 73], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tiles[-1], [47 / 48, 71 / 73, 1, 1], rtol=1e-12, atol=1e-15)

    # the processor's own pixels, packed by the model: each token's mean ramp coordinate
    ip = copy.deepcopy(adapter.processor.image_processor)
    ip.do_rescale = ip.do_normalize = False
    inner = getattr(adapter.model, "model", adapter.model)
    g = adapter.config.vision_config.image_size // adapter.config.vision_config.patch_size
    for size in [(500, 377), (97, 96), (13, 17), (200, 30), (60, 40)]:
        enc = ip(images=[_float_ramp(*size)], return_tensors="pt")
        pix = enc["pixel_values"][0].double()  # [1 + tiles, 3, 48, 48]
        n, _, s, _ = pix.shape
        u = pix.reshape(n, 3, g, s // g, g, s // g).mean((3, 5))  # per patch token
        feats = torch.stack([u[:, 0] * u[:, 2], u[:, 1] * u[:, 2], u[:, 2]], -1).reshape(n, g * g, 3)
        packed, _ = inner.pack_image_features([feats], enc["image_sizes"], "default",
                                              image_newline=torch.full((3,), -1.0))
        seen = packed[0].numpy()
        lay = adapter.prepare([random_image(5, size)], [Q]).layouts[0]
        assert len(seen) == lay.num_tokens
        full = lay.spatial & (seen[:, 2] > 0.999)  # tokens wholly over the image (padding: 0)
        assert full.sum() > 0.8 * lay.spatial.sum()
        # resampling clamps at the border: the 2 outer original pixels hold no exact ramp
        m = np.array([2 / size[0], 2 / size[1]])
        with np.errstate(invalid="ignore"):
            full &= (lay.rects[:, :2] >= m).all(1) & (lay.rects[:, 2:] <= 1 - m).all(1)
        r = lay.rects[full]
        for axis in (0, 1):
            centre, width = (r[:, axis] + r[:, axis + 2]) / 2, r[:, axis + 2] - r[:, axis]
            err = np.abs(seen[full, axis] / seen[full, 2] - centre) / width
            assert err.max() < 0.05, (size, axis, err.max())  # was up to 0.39 of a token


@pytest.mark.parametrize("device, why", [("gpu", "not a device"), ("", "not a device"),
                                         ("cuda:x", "not a device"), ("meta", "holds no weights"),
                                         ("mps", "no mps device"), ("xpu", "no xpu device")])
def test_wrong_device_is_one_line_before_the_weights_load(tiny_dir, monkeypatch, device, why):
    """A device torch cannot parse, or one this machine lacks, was a raw RuntimeError /
    AssertionError (a traceback from the CLI) after the weights had loaded, and 'meta'
    loaded a model without weights."""
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parsing is refused first
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    loads = []
    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a)))
    with pytest.raises(VislensError, match=f"--device {device!r}: .*{why}") as info:
        load_model(tiny_dir("llava"), dtype="float32", device=device)
    assert "\n" not in str(info.value) and not loads


def test_integer_device_and_cpu_index_still_load(tiny_dir, monkeypatch):
    from vislens.models import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(1) == "cuda:1"
    with pytest.raises(VislensError, match="2 CUDA device"):
        resolve_device(2)
    assert load_model(tiny_dir("llava"), dtype="float32", device="cpu:0").device.type == "cpu"


def test_non_floating_dtype_and_revision_of_a_folder_are_refused(tiny_dir):
    with pytest.raises(VislensError, match="dtype torch.int8: .*floating"):
        load_model(tiny_dir("llava"), dtype=torch.int8, device="cpu")
    # a folder has no revisions: the capture would record one that was never loaded
    with pytest.raises(VislensError, match="revision 'v1'.*local directory"):
        load_model(tiny_dir("llava"), dtype="float32", device="cpu", revision="v1")


def _copy_checkpoint(src, dst, rename=None, architectures=None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if rename:
        weights = load_file(dst / "model.safetensors")
        save_file({rename(k): v for k, v in weights.items()}, dst / "model.safetensors",
                  metadata={"format": "pt"})
    if architectures:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["architectures"] = architectures
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_checkpoint_whose_weights_do_not_fit_the_model_is_refused(tiny_dir, tmp_path):
    """Weights stored under other names (the original LLaVA repository's ``model.layers.*``)
    left the whole language model randomly initialised behind a log message: the run
    'worked' on a random model."""
    bad = _copy_checkpoint(tiny_dir("llava"), tmp_path / "renamed", rename=lambda k: k.replace(
        "language_model.model.", "model.", 1).replace("language_model.lm_head", "lm_head"))
    with pytest.raises(VislensError, match=r"renamed: .*29 weight\(s\) missing .*"
                                           r"model\.language_model\.embed_tokens\.weight") as info:
        load_model(bad, dtype="float32", device="cpu")
    assert "\n" not in str(info.value)
    # a weight of another shape was transformers' RuntimeError (a traceback from the CLI)
    from safetensors.torch import load_file, save_file

    odd = _copy_checkpoint(tiny_dir("llava"), tmp_path / "odd")
    weights = load_file(odd / "model.safetensors")
    key = "multi_modal_projector.linear_1.weight"
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    save_file(weights, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VislensError, match=r"odd: .*1 weight\(s\) of another shape "
                                           r"\(e\.g\. model\.multi_modal_projector\.linear_1"):
        load_model(odd, dtype="float32", device="cpu")


def test_original_repository_llava_format_is_refused_before_loading(tiny_dir, tmp_path, monkeypatch):
    """liuhaotian/llava-v1.5-* say model_type 'llava' but architecture
    'LlavaLlamaForCausalLM', which is no transformers class: refused before the weights load."""
    from transformers import LlavaForConditionalGeneration

    orig = _copy_checkpoint(tiny_dir("llava"), tmp_path / "orig",
                            architectures=["LlavaLlamaForCausalLM"])
    loads = []
    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a)))
    with pytest.raises(VislensError, match="unsupported architecture 'LlavaLlamaForCausalLM'"):
        load_model(orig, dtype="float32", device="cpu")
    assert not loads
    with pytest.raises(VislensError, match="unsupported architecture 'LlavaLlamaForCausalLM'"):
        model_dims(orig)  # (read the default LlavaConfig's dims: 32 layers, 32 heads)


def test_auto_dtype_is_bfloat16_on_balanced_gpus(monkeypatch):
    """--device balanced spreads the model over CUDA devices: 'auto' means bfloat16 there as on
    one GPU (it was float32: twice the memory of the 7B model over the GPUs)."""
    from vislens.models import resolve_device, resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("balanced", "cuda", "cuda:1"):
        assert resolve_dtype("auto", resolve_device(device)) == torch.bfloat16
    assert resolve_dtype("auto", resolve_device("cpu")) == torch.float32


def test_weights_load_straight_onto_the_device(tiny_dir, monkeypatch):
    """A single device is given to from_pretrained as the device map, so a 7B model's weights
    go to the GPU as they are read instead of first filling host memory; the model ends up
    there with the same weights as a plain load moved afterwards."""
    import transformers

    seen: list[object] = []
    cls = transformers.LlavaForConditionalGeneration
    real = cls.from_pretrained.__func__

    def recording(klass, *a, **kw):
        seen.append(kw.get("device_map"))
        return real(klass, *a, **kw)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    adapter = load_model(str(tiny_dir("llava")), device="cpu", dtype="float32")
    assert seen == [{"": "cpu"}]
    monkeypatch.undo()
    plain = cls.from_pretrained(str(tiny_dir("llava")), dtype=torch.float32).to("cpu")
    for (name, a), (_, b) in zip(sorted(adapter.model.state_dict().items()),
                                 sorted(plain.state_dict().items())):
        assert a.device.type == "cpu" and torch.equal(a, b), name
