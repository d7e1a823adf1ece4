"""Building the organism: the LLaVA-1.5-shaped architecture and its wired initialisation."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import VislensError
from .config import ORGANISM, SMALL, prompt

__all__ = ["build_organism", "count_parameters", "save"]


def _grid_positions(grid: int, dim: int, scale: float) -> "torch.Tensor":
    """2-D sine/cosine codes of a ``grid`` x ``grid`` patch grid (row-major), ``[g*g, dim]``.

    Half of the channels encode the row, half the column, at geometric frequencies. Used to
    initialise CLIP's (learned) position embeddings so that "where" is linearly readable
    from the start; training is free to change them.
    """
    import torch

    if dim % 4:
        raise VislensError(f"vision hidden size must be a multiple of 4, got {dim}")
    n = dim // 4
    freqs = 1.0 / (grid ** (torch.arange(n, dtype=torch.float64) / max(n - 1, 1)))
    idx = torch.arange(grid, dtype=torch.float64)
    ang = idx[:, None] * freqs[None, :] * math.pi / 2  # [g, n]: a quarter turn per patch down
    # to a quarter turn over the whole grid (monotonic, so "further left" is linear)
    code = torch.cat([ang.sin(), ang.cos()], dim=1)  # [g, 2n]
    rows = code[:, None, :].expand(grid, grid, 2 * n)
    cols = code[None, :, :].expand(grid, grid, 2 * n)
    return (torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim) * scale).float()


def build_organism(out_dir: str | Path | None = None, *, seed: int = 0, small: bool = False):
    """Build the untrained organism (``small``: the fast test variant); return (model, processor).

    With ``out_dir`` both are also saved there (``save_pretrained``), loadable with
    :func:`vislens.models.load_model`.
    """
    import torch
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    from ..models.tiny import BASE_WORDS, LLAVA_TEMPLATE, clip_vision_config, llama_text_config, word_tokenizer
    from ..synth import object_names

    arch = SMALL if small else ORGANISM
    torch.manual_seed(seed)
    tok = word_tokenizer(list(BASE_WORDS) + object_names(),
                         ["<s>", "</s>", "<pad>", "<image>", "USER", "ASSISTANT"],
                         bos="<s>", eos="</s>", pad="<pad>",
                         extra_special={"image_token": "<image>"})
    ids = tok.convert_tokens_to_ids
    text = llama_text_config(len(tok), ids("<pad>"), ids("<s>"), ids("</s>"), hidden=arch["hidden"],
                       layers=arch["layers"], heads=arch["heads"], kv_heads=arch["kv_heads"],
                       init=arch["init"])
    vision = clip_vision_config(arch["image_size"], arch["patch"], arch["vision_hidden"], arch["init"])
    vision.num_hidden_layers = arch["vision_layers"]
    vision.num_attention_heads = arch["vision_heads"]
    grid = arch["image_size"] // arch["patch"]
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=grid * grid, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration._from_config(cfg)
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():
        emb[0].zero_()  # CLS
        emb[1:] = _grid_positions(grid, arch["vision_hidden"], 0.15)
    size = arch["image_size"]
    ip = CLIPImageProcessor(size={"shortest_edge": size},
                            crop_size={"height": size, "width": size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=arch["patch"],
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                          num_additional_image_tokens=1)
    _wire_init(model, proc, grid, seed)
    if out_dir is not None:
        save(model, proc, Path(out_dir))
    return model, proc


def _cell_owners(scene, grid: int) -> "np.ndarray":
    """Which object covers each patch, ``[grid*grid]``: 0/1 = subject/reference (every pixel
    of the patch has its colour), -1 = plain background, -2 = mixed."""
    import numpy as np

    from ..synth import OBJECTS

    colour = {o.name: o.color for o in OBJECTS}
    arr = np.asarray(scene.image.convert("RGB"))
    step = arr.shape[0] // grid
    owner = np.full(arr.shape[:2], -1, dtype=np.int64)
    for k, name in enumerate(scene.sample.objects):
        owner[(arr == colour[name]).all(-1)] = k
    cells = owner[:grid * step, :grid * step].reshape(grid, step, grid, step).transpose(0, 2, 1, 3)
    cells = cells.reshape(grid * grid, step * step)
    out = np.where((cells == cells[:, :1]).all(1), cells[:, 0], -2)
    return out


def _image_statistics(model, processor, grid: int, seed: int):
    """Normalised projected patch features of seeded scenes, grouped for :func:`_wire_init`.

    Returns (features ``[N, hidden]`` as the first LM layer sees them, per-patch owner object
    name or ``""`` for background / ``None`` for mixed patches, per-patch (column, row) in
    [-1, 1])."""
    import numpy as np
    import torch

    from ..synth import generate_scenes

    scenes = generate_scenes(48, "a", seed) + generate_scenes(48, "b", seed)
    pv = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
    lm = model.model.language_model
    with torch.no_grad():
        hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = lm.layers[0].input_layernorm(model.model.multi_modal_projector(hs))
    owners: list = []
    for s in scenes:
        own = _cell_owners(s, grid)
        owners += [s.sample.objects[k] if k >= 0 else ("" if k == -1 else None) for k in own]
    rc = np.stack(np.divmod(np.arange(grid * grid), grid), axis=1)[:, ::-1]  # (col, row)
    xy = torch.tensor(np.tile(rc, (len(scenes), 1)) / (grid - 1) * 2 - 1, dtype=torch.float64)
    return feats.reshape(-1, feats.shape[-1]).double(), owners, xy


def _wire_init(model, processor, grid: int, seed: int, *, pairs: int = 4) -> None:
    """Start the language model from a rough "look at the two named objects" circuit.

    A real LLaVA starts its instruction tuning from aligned parts (CLIP features, a
    pretrained projector and LM), so finding a named object is easy for it. From a random
    init the organism would have to discover word -> colour -> position bindings through 576
    mostly-background image tokens, a three-way interaction that plain training does not
    find in the CPU budget. So the init wires (all weights stay trainable):

    * the projector's output is scaled to unit RMS; object names embed as a code of their
      object's look (discriminant directions of its patch features) plus an "object name"
      marker, and the answer token ``:`` carries a query direction;
    * layer 0, heads 0 and 1: from the answer position, attend to the first (subject) and the
      last (reference) object name (a content term on the lowest-frequency RoPE pair, a
      primacy/recency term on the pair of frequency ~0.1) and copy their codes into two
      separate subspaces;
    * layer 1, heads 0 and 1: from the answer position, attend to the patches matching the
      subject's / reference's code (nearly position-free low-frequency RoPE pairs) and
      write their mean position (a linear read-out of column and row) into the residual.

    What is left to learn is the read-out (relation from the two positions), the vision
    features and everything else; the answer position's image attention falls on the
    objects from the start, as the paper expects of a well-behaved VLM.
    """
    import torch

    lm = model.model.language_model
    cfg = lm.config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    d = hidden // heads
    if cfg.num_key_value_heads != heads or heads < 2 or cfg.num_hidden_layers < 2:
        raise VislensError("the organism's init needs >= 2 layers and >= 2 heads without GQA")
    proj = model.model.multi_modal_projector
    feats, owners, xy = _image_statistics(model, processor, grid, seed)
    with torch.no_grad():  # unit-RMS image features: they dominate their residual streams
        raw = proj(model.model.vision_tower(
            processor.image_processor([_blank(processor.image_processor.crop_size["height"])],
                                      return_tensors="pt")["pixel_values"],
            output_hidden_states=True).hidden_states[-2][:, 1:])
        gain = 1.0 / float(raw.pow(2).mean().sqrt())
        proj.linear_2.weight.mul_(gain)
        proj.linear_2.bias.mul_(gain)
    names = sorted({o for o in owners if o}, key=lambda n: owners.index(n))
    groups = {"": [], **{n: [] for n in names}}
    for i, o in enumerate(owners):
        if o is not None:
            groups[o].append(i)
    classes = [feats[groups[""]]] + [feats[groups[n]] for n in names]
    means = torch.stack([c.mean(0) for c in classes])
    diff = means[1:] - means[0]  # object minus background, [O, hidden]
    r = min(2 * pairs, d // 4, len(names) - 1)  # pairs slow enough over ~600 tokens
    r -= r % 2
    # keys: discriminant directions (between-object over within-object spread, the latter
    # mostly position), so matching is by colour/shape rather than place
    within = sum(torch.cov(c.T) * (len(c) - 1) for c in classes) / sum(len(c) for c in classes)
    within = within + 1e-3 * within.diagonal().mean() * torch.eye(hidden, dtype=torch.float64)
    inv = torch.linalg.inv(torch.linalg.cholesky(within))
    vecs = torch.linalg.eigh(inv @ torch.cov(means.T) @ inv.T).eigenvectors
    basis = (inv.T @ vecs[:, -r:]).T
    basis = basis / basis.norm(dim=-1, keepdim=True)  # [r, hidden]
    codes = diff @ basis.T
    unit = codes / codes.norm(dim=-1, keepdim=True)
    # position read-out: least squares (column, row) from features of object patches
    obj = [i for i, o in enumerate(owners) if o]
    pos = torch.linalg.lstsq(feats[obj], xy[obj]).solution.T  # [2, hidden]
    # text-side directions, orthonormal and orthogonal to the key basis
    gen = torch.Generator().manual_seed(seed)
    k_text = r + 1 + 1 + r + r + 2 + 2
    rand = torch.randn(hidden, k_text, generator=gen, dtype=torch.float64)
    ortho = torch.linalg.qr(basis.T).Q
    rand = rand - ortho @ (ortho.T @ rand)
    dirs = torch.linalg.qr(rand).Q.T  # [k_text, hidden]
    word_dirs, marker, query = dirs[:r], dirs[r], dirs[r + 1]
    q_subj, q_ref = dirs[r + 2:2 * r + 2], dirs[2 * r + 2:3 * r + 2]
    x_subj, x_ref = dirs[3 * r + 2:3 * r + 4], dirs[3 * r + 4:3 * r + 6]

    root = math.sqrt(hidden)
    tok = processor.tokenizer
    emb = lm.embed_tokens.weight
    half = d // 2
    inv_freq = lm.rotary_emb.inv_freq.double()
    slow = half - 1  # lowest frequency pair: content
    fast = int(torch.argmin((inv_freq - 0.1).abs()))  # ~0.1 rad/token: primacy/recency
    d_subj, d_ref = _name_offsets(processor)
    c_s, c_r = math.cos(inv_freq[fast] * d_subj), math.cos(inv_freq[fast] * d_ref)
    k_scale = hidden * math.sqrt(0.5) / math.sqrt(d)  # (query . x)(marker . x) / sqrt(d)
    a_pos = 6.0 / (k_scale * abs(c_r - c_s))  # 6 logits between subject and reference
    a_con = (12.0 - k_scale * a_pos * max(abs(c_s), abs(c_r))) / k_scale
    low = [*range(half - r // 2, half), *range(d - r // 2, d)]
    with torch.no_grad():
        for name, u in zip(names, unit):
            vec = root * (math.sqrt(0.5) * (u @ word_dirs) + math.sqrt(0.5) * marker)
            for form in dict.fromkeys([name, name.capitalize(), name.upper()]):
                idx = tok.convert_tokens_to_ids(form)
                if idx is not None and idx != tok.unk_token_id:
                    emb[idx] = vec.float()
        emb[tok.convert_tokens_to_ids(":")] = (root * query).float()
        # layer 0: answer -> subject name (head 0, primacy) / reference name (head 1, recency)
        att = lm.layers[0].self_attn
        for h, sign, dest in ((0, -1.0, q_subj), (1, 1.0, q_ref)):
            rows = slice(h * d, (h + 1) * d)
            for w in (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight):
                w[rows] = 0.0
            att.q_proj.weight[h * d + slow] = (a_con * query).float()
            att.k_proj.weight[h * d + slow] = marker.float()
            att.q_proj.weight[h * d + fast] = (a_pos * query).float()
            att.k_proj.weight[h * d + fast] = (sign * marker).float()
            att.v_proj.weight[h * d:h * d + r] = word_dirs.float()
            att.o_proj.weight[:, rows] = 0.0
            att.o_proj.weight[:, h * d:h * d + r] = dest.T.float()
        # layer 1: answer -> the patches that match each code; write their mean position
        q_norm = 0.5 * root  # the codes' share of the answer's normalised residual
        m_scale = math.sqrt(8.0 * math.sqrt(d) / (q_norm * float(codes.norm(dim=-1).mean())))
        att = lm.layers[1].self_attn
        for h, src, dest in ((0, q_subj, x_subj), (1, q_ref, x_ref)):
            rows = slice(h * d, (h + 1) * d)
            for w in (att.q_proj.weight, att.k_proj.weight, att.v_proj.weight):
                w[rows] = 0.0
            att.q_proj.weight[[h * d + i for i in low]] = (m_scale * src).float()
            att.k_proj.weight[[h * d + i for i in low]] = (m_scale * basis).float()
            att.v_proj.weight[h * d:h * d + 2] = pos.float()
            att.o_proj.weight[:, rows] = 0.0
            att.o_proj.weight[:, h * d:h * d + 2] = (0.5 * root * dest.T).float()


def _blank(size: int):
    """A plain background image (the projector's output scale is measured on it)."""
    from PIL import Image

    return Image.new("RGB", (size, size), (238, 236, 230))


def _name_offsets(processor) -> tuple[int, int]:
    """Tokens from the subject's and the reference's name to the answer position."""
    from ..synth import generate_scenes

    s = generate_scenes(1, "a", 0)[0]
    ids = processor.tokenizer(prompt(s.sample.question), add_special_tokens=False)["input_ids"]
    toks = processor.tokenizer.convert_ids_to_tokens(ids)
    subj, ref = s.sample.objects
    return len(toks) - 1 - toks.index(subj), len(toks) - 1 - toks.index(ref)


def save(model, processor, out: Path) -> None:
    """``save_pretrained`` of both into ``out`` (created), loadable with ``load_model``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def count_parameters(model) -> dict[str, int]:
    """Parameters per part (vision tower, projector, language model incl. head) and total."""
    parts = {"vision_tower": model.model.vision_tower, "projector": model.model.multi_modal_projector,
             "language_model": model.model.language_model, "lm_head": model.lm_head}
    out = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    out["total"] = sum(p.numel() for p in model.parameters())
    return out
