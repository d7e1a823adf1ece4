"""Decoding conditions (greedy, ScalingVis, AdaptVis, additive) sharing one prefix prefill.

An intervention changes only the attention row of the last prompt token, so the KV cache of
the first ``n-1`` tokens is the same under every condition. The engine prefills those once
per batch, then runs the last token once per distinct *steering setting* (a scale or an
additive shift of the image-key logits, possibly restricted to layers/heads), records its
attention row, and continues greedily (unsteered, like the paper) only where some condition
needs the generated text. AdaptVis reuses the baseline step for its confidence, then reuses
(or runs) the steps of alpha1/alpha2, each sample taking its own alpha.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import VislensError
from .models.base import PreparedBatch, VLMAdapter
from .steering import Steerer, interventions_for

# ----------------------------------------------------------------------------- conditions

#: method -> (required parameters, optional parameters with defaults)
METHODS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "baseline": ((), {}),
    "scaling": (("alpha",), {}),
    "adaptvis": (("alpha1", "alpha2", "beta"), {}),
    "add": (("delta",), {}),
    # baselines (contrastive decoding rules, no attention steering)
    "vcd": ((), {"alpha": 1.0, "beta": 0.1, "noise_steps": 500, "seed": 0}),
    "dola": ((), {"relative_top": 0.1}),
}
_COMMON = {"layers": None, "heads": None, "name": None}
#: methods whose ``layers`` option is a string (not a steering restriction)
_STRING_OPTIONS = {"dola": {"layers": "high"}}
CONTRASTIVE = ("vcd", "dola")


@dataclass(frozen=True)
class Condition:
    """One decoding condition, e.g. ``scaling:alpha=0.5`` or ``adaptvis:alpha1=0.5,...``.

    ``layers``/``heads`` restrict the intervention (None = all, as in the paper).
    """

    name: str
    method: str
    params: tuple[tuple[str, float], ...] = ()
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    options: tuple[tuple[str, str], ...] = ()

    def __getitem__(self, key: str) -> Any:
        merged = {**dict(self.options), **dict(self.params)}
        return merged[key]

    def attrs(self) -> dict[str, Any]:
        """What the capture file stores about this condition."""
        out: dict[str, Any] = {"method": self.method, "spec": self.spec()}
        out.update(dict(self.params))
        out.update(dict(self.options))
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.heads is not None:
            out["heads"] = list(self.heads)
        return out

    def spec(self) -> str:
        parts = [f"{k}={_fmt(v)}" for k, v in self.params]
        parts += [f"{k}={v}" for k, v in self.options]
        if self.layers is not None:
            parts.append("layers=" + _fmt_ints(self.layers))
        if self.heads is not None:
            parts.append("heads=" + _fmt_ints(self.heads))
        return self.method + (":" + ",".join(parts) if parts else "")


def _fmt(v: float) -> str:
    return f"{v:g}"


def _fmt_ints(v: Sequence[int]) -> str:
    return "+".join(str(i) for i in v)


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    out: list[int] = []
    try:
        for part in text.replace("+", " ").replace(";", " ").split():
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise VislensError(f"condition option {what}={text!r}: expected integers like 0-15 or 3+7") from None
    return tuple(sorted(set(out)))


def parse_condition(text: str) -> Condition:
    """Parse ``method[:key=value,...]`` (the ``--condition`` syntax) and validate it.

    Layers/heads take ranges joined by ``+``: ``scaling:alpha=2,layers=8-15+20``.
    """
    method, _, rest = text.strip().partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise VislensError(f"unknown condition method {method!r} in {text!r}; choose one of "
                           f"{', '.join(METHODS)}")
    required, optional = METHODS[method]
    string_opts = _STRING_OPTIONS.get(method, {})
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq:
            raise VislensError(f"condition {text!r}: expected key=value, got {item!r}")
        if key not in required and key not in optional and key not in _COMMON:
            allowed = list(required) + list(optional) + list(_COMMON)
            raise VislensError(f"condition {text!r}: unknown option {key!r} for {method} "
                               f"(allowed: {', '.join(allowed)})")
        values[key] = val.strip()
    missing = [k for k in required if k not in values]
    if missing:
        raise VislensError(f"condition {text!r}: missing {', '.join(missing)}")
    options = tuple((k, values.pop(k, default)) for k, default in string_opts.items())
    params = []
    for key in list(required) + list(optional):
        if key not in values:
            params.append((key, float(optional[key])))
            continue
        try:
            num = float(values[key])
        except ValueError:
            raise VislensError(f"condition {text!r}: {key}={values[key]!r} is not a number") from None
        params.append((key, num))
    cond = Condition(name=values.get("name") or _default_name(method, dict(params)),
                     method=method, params=tuple(params), options=options,
                     layers=_parse_ints(values["layers"], "layers") if "layers" in values else None,
                     heads=_parse_ints(values["heads"], "heads") if "heads" in values else None)
    validate_condition(cond)
    return cond


def _default_name(method: str, p: dict[str, float]) -> str:
    if method == "scaling":
        return f"scaling-{_fmt(p['alpha'])}"
    if method == "add":
        return f"add{p['delta']:+g}"  # add+1, add-0.5
    return method  # baseline, adaptvis, vcd, dola


def validate_condition(cond: Condition) -> None:
    """Reject non-finite or out-of-range parameters before any work starts."""
    for key, v in cond.params:
        if not math.isfinite(v):
            raise VislensError(f"condition {cond.name}: {key}={v} is not finite")
    p = dict(cond.params)
    for key in ("alpha", "alpha1", "alpha2"):
        if key in p and p[key] <= 0:
            raise VislensError(f"condition {cond.name}: {key}={p[key]:g} must be > 0 (a temperature)")
    if cond.method == "vcd":
        if p["alpha"] < 0:
            raise VislensError(f"condition {cond.name}: alpha={p['alpha']:g} must be >= 0")
        if not 0.0 < p["beta"] <= 1.0:
            raise VislensError(f"condition {cond.name}: beta={p['beta']:g} must be in (0, 1] "
                               "(the plausibility cutoff)")
        if not (0 <= p["noise_steps"] < NOISE_STEPS and float(p["noise_steps"]).is_integer()):
            raise VislensError(f"condition {cond.name}: noise_steps={p['noise_steps']:g} must be "
                               f"an integer in [0, {NOISE_STEPS - 1}]")
        return
    if cond.method == "dola":
        if not 0.0 < p["relative_top"] < 1.0:
            raise VislensError(f"condition {cond.name}: relative_top={p['relative_top']:g} "
                               "must be in (0, 1)")
        layers = cond["layers"]
        if layers not in ("high", "low"):
            _parse_ints(layers, "layers")
        return
    if "beta" in p and not 0.0 <= p["beta"] <= 1.0:
        raise VislensError(f"condition {cond.name}: beta={p['beta']:g} must be in [0, 1] "
                           "(a probability threshold)")
    if cond.method == "adaptvis" and not p["alpha1"] <= p["alpha2"]:
        raise VislensError(f"condition {cond.name}: alpha1={p['alpha1']:g} should smooth and "
                           f"alpha2={p['alpha2']:g} sharpen (alpha1 <= alpha2)")


def check_conditions(conds: Sequence[Condition], num_layers: int | None = None,
                     num_heads: int | None = None) -> None:
    """A job's conditions: some, uniquely named, and (given the model's counts) every
    ``layers=``/``heads=`` restriction non-empty and inside the model."""
    names = [c.name for c in conds]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VislensError(f"two conditions are named {dup[0]!r}; add name=... to one of them")
    if not conds:
        raise VislensError("no condition given (e.g. --condition baseline)")
    for c in conds:
        for what, sel, count in (("layers", c.layers, num_layers), ("heads", c.heads, num_heads)):
            if sel is None:
                continue
            if not sel:
                raise VislensError(f"condition {c.name}: {what}= selects nothing")
            if count is not None and not all(0 <= i < count for i in sel):
                bad = next(i for i in sel if not 0 <= i < count)
                raise VislensError(f"condition {c.name}: {what[:-1]} {bad} is outside the "
                                   f"model's {what} 0-{count - 1}")


# ----------------------------------------------------------------------------- results

@dataclass
class ConditionResult:
    """One sample under one condition."""

    text: str
    first_token: int
    confidence: float
    option_probs: np.ndarray
    alpha_used: float
    image_attention: np.ndarray | None = None  # [L, H, G, G] (engine's attention_dtype)
    image_mass: np.ndarray | None = None  # [L, H]
    text_mass: np.ndarray | None = None  # [L, H]
    n_image_tokens: int = 0  # image tokens of this sample's prompt (Figure 3's token share)
    n_text_tokens: int = 0  # other non-padding prompt tokens
    extras: dict[str, Any] = field(default_factory=dict)


SettingKey = tuple[str, "float | tuple[float, ...]", "tuple[int, ...] | None", "tuple[int, ...] | None"]
BASELINE_KEY: SettingKey = ("scale", 1.0, None, None)


def setting_of(cond: Condition, alpha: float | None = None) -> SettingKey:
    """The steering setting a (non-adaptive) condition, or AdaptVis with a chosen alpha, uses."""
    if cond.method == "baseline":
        return BASELINE_KEY
    if cond.method == "add":
        return ("add", cond["delta"], cond.layers, cond.heads)
    value = cond["alpha"] if alpha is None else alpha
    if value == 1.0:
        return BASELINE_KEY
    return ("scale", float(value), cond.layers, cond.heads)


def adaptvis_alpha(confidence: np.ndarray, alpha1: float, alpha2: float, beta: float) -> np.ndarray:
    """Eq. 3: alpha1 (smooth) where the unsteered confidence is below beta, else alpha2."""
    confidence = np.asarray(confidence, dtype=np.float64)
    return np.where(confidence < beta, alpha1, alpha2)


NOISE_STEPS = 1000  # VCD's diffusion schedule length


def diffusion_noise(x: torch.Tensor, noise_steps: int, generator: torch.Generator) -> torch.Tensor:
    """VCD's distorted view: the forward diffusion process run ``noise_steps`` of 1000 steps.

    ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` with a sigmoid beta schedule from 1e-5
    to 5e-3 (as VCD uses), applied to the processed pixel tensor.
    """
    betas = torch.sigmoid(torch.linspace(-6, 6, NOISE_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[int(noise_steps)]
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, torch.float32)
    return (abar.sqrt() * x.float() + (1 - abar).sqrt() * eps).to(x.dtype)


def vcd_scores(real: torch.Tensor, noisy: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Visual contrastive decoding: ``(1 + alpha) l(v) - alpha l(v')`` on plausible tokens.

    Tokens whose probability under the real image is below ``beta`` times the most likely
    token's get -inf (the adaptive plausibility constraint).
    """
    real, noisy = real.float(), noisy.float()
    cutoff = math.log(beta) + real.max(dim=-1, keepdim=True).values
    scores = (1 + alpha) * real - alpha * noisy
    return scores.masked_fill(real < cutoff, float("-inf"))


def dola_candidates(spec: str, num_layers: int) -> list[int]:
    """Premature-layer candidates (hidden-state indices; 0 = embeddings) for DoLa.

    ``"low"``/``"high"``: every second layer of the lower/upper half (for models over 40
    layers, the first/last 20), as the DoLa paper and transformers 4.x did; or an explicit
    list such as ``"0+2+4"``. The final layer is never a candidate.
    """
    if spec in ("low", "high"):
        if num_layers <= 40:
            lo, hi = (0, num_layers // 2) if spec == "low" else (num_layers // 2, num_layers)
        else:
            lo, hi = (0, 20) if spec == "low" else (num_layers - 20, num_layers)
        layers = list(range(lo, hi, 2))
    else:
        layers = list(_parse_ints(spec, "layers"))
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad or not layers:
        raise VislensError(f"dola layers={spec!r}: need indices in [0, {num_layers - 1}] "
                           f"(0 = embeddings, {num_layers} = final layer)")
    return layers


def dola_scores(final: torch.Tensor, premature: torch.Tensor, relative_top: float = 0.1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """DoLa: contrast the final layer with the premature layer of largest Jensen-Shannon divergence.

    ``final`` [B, V] logits, ``premature`` [C, B, V] early-exit logits of the candidates.
    Returns the scores ``log p_final - log p_premature`` (-inf where ``p_final`` is below
    ``relative_top`` times its maximum) and the chosen candidate index per row.
    """
    lf = torch.log_softmax(final.float(), dim=-1)
    lp = torch.log_softmax(premature.float(), dim=-1)
    m = 0.5 * (lf.exp()[None] + lp.exp())
    log_m = m.clamp_min(1e-30).log()
    kl_f = (lf.exp()[None] * (lf[None] - log_m)).sum(-1)
    kl_p = (lp.exp() * (lp - log_m)).sum(-1)
    jsd = 0.5 * (kl_f + kl_p)  # [C, B]
    pick = jsd.argmax(dim=0)  # [B]
    chosen = lp[pick, torch.arange(final.shape[0], device=final.device)]
    cutoff = math.log(relative_top) + lf.max(dim=-1, keepdim=True).values
    return (lf - chosen).masked_fill(lf < cutoff, float("-inf")), pick


@dataclass
class _Step:
    """What one steering setting produced for the whole batch."""

    logits: torch.Tensor  # [B, V] fp32, first generated token
    probs: torch.Tensor  # [B, V] fp32
    grids: np.ndarray | None  # [B, L, H, G, G]
    image_mass: np.ndarray | None
    text_mass: np.ndarray | None
    tokens: list[list[int]] | None = None  # generated continuation (None: not generated)
    rows: dict[int, torch.Tensor] | None = None  # raw [B, H, K] rows when keep_rows


class DecodingEngine:
    """Runs several conditions over a batch with one shared prefix prefill.

    ``record`` stores the answer position's attention (grid, image and text mass) per
    condition; ``max_new_tokens`` bounds the greedy continuation (1 = first token only).
    """

    def __init__(self, adapter: VLMAdapter, *, max_new_tokens: int = 16, grid: int = 24,
                 record: bool = True, attention_dtype: torch.dtype = torch.float32) -> None:
        if max_new_tokens < 1:
            raise VislensError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.adapter = adapter
        self.model = adapter.model
        self.max_new_tokens = max_new_tokens
        self.grid = grid
        self.record = record
        self.attention_dtype = attention_dtype  # float16 halves the device->host copy for stores
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.forward_calls = 0

    # -- forward helpers ----------------------------------------------------------------
    def _forward(self, **kw) -> Any:
        self.forward_calls += 1
        if self._keep_kw:
            kw[self._keep_kw] = 1
        return self.model(**kw)

    def _cache_of(self, out: Any) -> Any:
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def prefill(self, batch: PreparedBatch) -> Any:
        """Run the first n-1 prompt tokens (all image tokens included) and return the cache."""
        out = self._forward(input_ids=batch.input_ids[:, :-1],
                            attention_mask=batch.attention_mask[:, :-1],
                            position_ids=batch.position_ids[..., :-1], use_cache=True,
                            **batch.vision)
        return self._cache_of(out)

    def step(self, batch: PreparedBatch, cache: Any, key: SettingKey, generate: bool = False,
             keep_rows: bool = False, record: bool | None = None) -> _Step:
        """Run the last prompt token under one steering setting on top of the prefix cache.

        The cache is cropped back to the prefix afterwards, ready for the next setting.
        """
        kind, value, layers, heads = key
        b = batch.size
        # a scalar applies to every row; a tuple gives each row its own value (AdaptVis)
        values = list(value) if isinstance(value, tuple) else [value] * b
        ivs = interventions_for(kind, values, layers=layers, heads=heads)
        record = self.record if record is None else record
        steerer = Steerer(batch.image_keys, interventions=ivs, record=record)
        with steerer:
            out = self._forward(input_ids=batch.input_ids[:, -1:],
                                attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids[..., -1:],
                                use_cache=True, **{self._cache_kw: cache})
        logits = out.logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        grids = imass = tmass = None
        if record:
            grids, imass, tmass = self.reduce_records(batch, steerer.records)
        tokens = self._continue(batch, cache, probs) if generate else None
        cache.crop(-(1 + (len(tokens[0]) - 1 if tokens else 0)))
        return _Step(logits, probs, grids, imass, tmass, tokens,
                     steerer.records if keep_rows else None)

    def _continue(self, batch: PreparedBatch, cache: Any, probs: torch.Tensor) -> list[list[int]]:
        """Greedy, unsteered continuation after the first token; leaves tokens in ``cache``."""
        def scores(tok, mask, pos):
            return self._forward(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                                 use_cache=True, **{self._cache_kw: cache}).logits[:, -1]
        return self._decode_loop(batch, probs, scores)

    def _decode_loop(self, batch: PreparedBatch, first: torch.Tensor,
                     next_scores: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                     ) -> list[list[int]]:
        """Greedy decoding from the first token's scores; ``next_scores(tok, mask, pos)`` feeds
        one token per row and returns the next scores. Rows are padded with -1 after EOS to the
        number of tokens fed, so callers can crop their caches by that length."""
        eos = torch.tensor(sorted(self.adapter.eos_token_ids), device=first.device)
        tok = first.argmax(-1)
        seqs = [tok]
        done = torch.isin(tok, eos)
        mask = batch.attention_mask
        for step in range(self.max_new_tokens - 1):
            if bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            tok = next_scores(tok, mask, self.adapter.next_position(batch.position_ids, step)).argmax(-1)
            seqs.append(tok)
            done |= torch.isin(tok, eos)
        stacked = torch.stack(seqs, dim=1).tolist()
        eos_set = self.adapter.eos_token_ids
        n_fed = len(seqs)
        cut = []
        for row in stacked:
            end = next((j for j, t in enumerate(row) if t in eos_set), len(row))
            cut.append(row[:end] + [-1] * (n_fed - end))
        return cut

    def contrastive_step(self, batch: PreparedBatch, cache: Any, cond: Condition,
                         keys: Sequence[str], generate: bool) -> _Step:
        """VCD or DoLa decoding (no steering): first-token scores and optional continuation."""
        last = dict(input_ids=batch.input_ids[:, -1:], attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids[..., -1:], use_cache=True)
        if cond.method == "vcd":
            noisy = PreparedBatch(**{**batch.__dict__, "vision": self._noised(batch, cond, keys)})
            cache2 = self.prefill(noisy)
            caches = (cache, cache2)

            def both(**kw):
                outs = [self._forward(**kw, **{self._cache_kw: c}).logits[:, -1] for c in caches]
                return vcd_scores(outs[0], outs[1], cond["alpha"], cond["beta"])

            first = both(**last)
            step_scores = lambda tok, mask, pos: both(input_ids=tok[:, None], attention_mask=mask,
                                                      position_ids=pos, use_cache=True)
        else:
            cands = dola_candidates(cond["layers"], self.adapter.num_layers)
            head, norm = self.model.get_output_embeddings(), self.adapter.final_norm()

            def dola(**kw):
                out = self._forward(**kw, output_hidden_states=True, **{self._cache_kw: cache})
                hs = out.hidden_states
                prem = torch.stack([head(norm(hs[j][:, -1])) for j in cands])
                return dola_scores(out.logits[:, -1], prem, cond["relative_top"])[0]

            first = dola(**last)
            step_scores = lambda tok, mask, pos: dola(input_ids=tok[:, None], attention_mask=mask,
                                                      position_ids=pos, use_cache=True)
        tokens = self._decode_loop(batch, first, step_scores) if generate else None
        cache.crop(-(len(tokens[0]) if tokens else 1))
        probs = torch.softmax(first.float(), dim=-1)
        return _Step(first.float(), probs, None, None, None, tokens)

    def _noised(self, batch: PreparedBatch, cond: Condition, keys: Sequence[str]) -> dict[str, Any]:
        """The batch's pixel inputs with per-sample deterministic diffusion noise."""
        import hashlib

        pix = batch.vision["pixel_values"]
        if "image_grid_thw" in batch.vision:  # Qwen2-VL: patches of all images concatenated
            sizes = batch.vision["image_grid_thw"].prod(-1).tolist()
        else:
            sizes = [1] * pix.shape[0]
        parts, start = [], 0
        for key, n in zip(keys, sizes):
            digest = hashlib.sha256(f"{int(cond['seed'])}:{key}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            parts.append(diffusion_noise(pix[start:start + n], int(cond["noise_steps"]), gen))
            start += n
        return {**batch.vision, "pixel_values": torch.cat(parts)}

    def reduce_records(self, batch: PreparedBatch, records: dict[int, torch.Tensor]):
        """Answer-position rows [L][B, H, K] -> grid maps, image mass and text mass (numpy)."""
        layers = sorted(records)
        if len(layers) != self.adapter.num_layers:
            raise RuntimeError(f"recorded {len(layers)} of {self.adapter.num_layers} layers; "
                               "is the language model using the 'vislens' attention?")
        dev = records[layers[0]].device  # layers may sit on different GPUs (device_map)
        rows = torch.stack([records[l].to(dev) for l in layers], dim=1)  # [B, L, H, K]
        img = batch.image_keys[:, None, None, :].to(rows.device)
        image_mass = (rows * img).sum(-1)
        valid = batch.attention_mask.bool()[:, None, None, :].to(rows.device)
        text_mass = (rows * (valid & ~img)).sum(-1)
        g = self.grid
        grids = rows.new_zeros(rows.shape[0], *rows.shape[1:3], g * g)
        for i, layout in enumerate(batch.layouts):
            tok, cell, w = layout.projection_entries(g)  # sparse: a few cells per token
            pos = torch.as_tensor(layout.positions[tok], device=rows.device)
            vals = rows[i][..., pos] * torch.as_tensor(w, dtype=rows.dtype, device=rows.device)
            grids[i].index_add_(-1, torch.as_tensor(cell, device=rows.device), vals)
        grids = grids.reshape(*grids.shape[:3], g, g).to(self.attention_dtype)
        return (grids.cpu().numpy(), image_mass.cpu().numpy(),
                text_mass.cpu().numpy())

    # -- the public entry point ---------------------------------------------------------
    @torch.inference_mode()
    def run(self, images: Sequence[Any], questions: Sequence[str],
            options: Sequence[Sequence[str]], conditions: Sequence[Condition],
            sample_keys: Sequence[str] | None = None) -> list[dict[str, ConditionResult]]:
        """Results per sample (in input order), keyed by condition name.

        ``sample_keys`` (e.g. sample ids) seed per-sample randomness such as VCD's noise;
        they default to the questions.
        """
        check_conditions(conditions)
        batch = self.adapter.prepare(images, questions)
        keys = list(sample_keys) if sample_keys is not None else list(questions)
        opt_ids = [self.adapter.option_token_ids(o) for o in options]
        cache = self.prefill(batch)
        steps: dict[SettingKey, _Step] = {}
        b = batch.size
        gen = self.max_new_tokens > 1

        def need(key: SettingKey, generate: bool, record: bool = True) -> _Step:
            st = steps.get(key)
            record = record and self.record
            if st is None or (generate and st.tokens is None) or (record and st.grids is None):
                st = self.step(batch, cache, key, generate, record=record)
                steps[key] = st
            return st

        steered = [c for c in conditions if c.method not in CONTRASTIVE]
        fixed = {c.name: setting_of(c) for c in steered if c.method != "adaptvis"}
        adaptive = [c for c in steered if c.method == "adaptvis"]
        contrastive = [c for c in conditions if c.method in CONTRASTIVE]
        # the baseline step first: AdaptVis needs its confidence, VCD/DoLa its attention
        # (they do not change attention), and it is usually requested anyway
        if adaptive or contrastive or BASELINE_KEY in fixed.values():
            need(BASELINE_KEY, gen and BASELINE_KEY in fixed.values(),
                 record=BASELINE_KEY in fixed.values() or bool(contrastive))
        for key in dict.fromkeys(fixed.values()):
            need(key, gen)
        chosen: dict[str, np.ndarray] = {}
        adaptive_key: dict[str, SettingKey] = {}
        if adaptive:
            base_conf = steps[BASELINE_KEY].probs.max(-1).values.cpu().numpy()
            for c in adaptive:
                alphas = adaptvis_alpha(base_conf, c["alpha1"], c["alpha2"], c["beta"])
                chosen[c.name] = alphas
                row_keys = {setting_of(c, a) for a in alphas.tolist()}
                reusable = all(k in steps and (steps[k].tokens is not None or not gen)
                               for k in row_keys)
                if len(row_keys) > 1 and not reusable:
                    # one step in which every row gets its own alpha, instead of one step
                    # per alpha over the whole batch
                    key = ("scale", tuple(float(a) for a in alphas), c.layers, c.heads)
                    need(key, gen)
                    adaptive_key[c.name] = key
                else:
                    for k in row_keys:
                        need(k, gen)
        special = {c.name: self.contrastive_step(batch, cache, c, keys, gen) for c in contrastive}

        results: list[dict[str, ConditionResult]] = [{} for _ in range(b)]
        for c in conditions:
            for i in range(b):
                if c.name in special:
                    results[i][c.name] = self._result(special[c.name], i, opt_ids[i], 1.0,
                                                      attention=steps[BASELINE_KEY])
                    continue
                alpha = float(chosen[c.name][i]) if c.method == "adaptvis" else \
                    (c["alpha"] if c.method == "scaling" else 1.0)
                if c.method == "adaptvis":
                    key = adaptive_key.get(c.name) or setting_of(c, alpha)
                else:
                    key = fixed[c.name]
                results[i][c.name] = self._result(steps[key], i, opt_ids[i], alpha)
        n_img = batch.image_keys.sum(-1).tolist()
        n_all = batch.attention_mask.sum(-1).tolist()
        for i, res in enumerate(results):
            for r in res.values():
                r.n_image_tokens, r.n_text_tokens = int(n_img[i]), int(n_all[i] - n_img[i])
        return results

    def _result(self, st: _Step, i: int, opt_ids: Sequence[Sequence[int]], alpha: float,
                attention: _Step | None = None) -> ConditionResult:
        p = st.probs[i]
        first = int(p.argmax())
        if st.tokens is not None:
            ids = [t for t in st.tokens[i] if t >= 0]
        else:
            ids = [] if first in self.adapter.eos_token_ids else [first]
        text = self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
        att = attention if attention is not None else st
        option_probs = np.array([float(p[list(ids_k)].sum()) if ids_k else 0.0
                                 for ids_k in opt_ids], dtype=np.float32)
        return ConditionResult(
            text=text, first_token=first, confidence=float(p.max()), option_probs=option_probs,
            alpha_used=float(alpha),
            image_attention=None if att.grids is None else att.grids[i],
            image_mass=None if att.image_mass is None else att.image_mass[i],
            text_mass=None if att.text_mass is None else att.text_mass[i])


def run_conditions(adapter: VLMAdapter, images: Sequence[Any], questions: Sequence[str],
                   options: Sequence[Sequence[str]], conditions: Sequence[Condition | str], *,
                   max_new_tokens: int = 16, grid: int = 24, record: bool = True
                   ) -> list[dict[str, ConditionResult]]:
    """Convenience wrapper: parse string conditions and run one batch."""
    conds = [c if isinstance(c, Condition) else parse_condition(c) for c in conditions]
    engine = DecodingEngine(adapter, max_new_tokens=max_new_tokens, grid=grid, record=record)
    return engine.run(images, questions, options, conds)
