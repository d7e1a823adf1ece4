"""Executes planned decoding conditions over a batch, sharing one prefix prefill.

An intervention changes only the attention row of the last prompt token, so the KV cache of
the first ``n-1`` tokens is the same under every condition. The engine prefills those once
per batch, asks :func:`vislens.conditions.plan_conditions` which *steering settings*
(:class:`~vislens.conditions.SettingKey`: an intervention kind with its values and
restriction, and a decoding rule) each condition's rows need, runs the last token once per
distinct setting, records its attention row, and continues (greedy and unsteered, like the
paper, or by a contrastive rule) only where some condition needs the generated text.

Planning is in :mod:`vislens.conditions` (torch-free); this module knows no method.
Decoding rules are entries of :data:`RULES` (``greedy``, ``vcd``, ``dola``).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .conditions import (BASELINE_KEY, METHODS, NOISE_STEPS, Condition, ConditionResult, Plan,
                         SettingKey, adaptvis_alpha, check_conditions, dola_candidates,
                         parse_condition, plan_conditions)
from .errors import VislensError
from .models.base import PreparedBatch, VLMAdapter
from .registry import Registry
from .steering import Steerer, interventions_for

__all__ = ["BASELINE_KEY", "Condition", "ConditionResult", "DecodingEngine", "RULES",
           "SettingKey", "adaptvis_alpha", "check_conditions", "diffusion_noise",
           "dola_candidates", "dola_scores", "parse_condition", "run_conditions",
           "run_leaving_out", "vcd_scores"]


def diffusion_noise(x: torch.Tensor, noise_steps: int, generator: torch.Generator) -> torch.Tensor:
    """VCD's distorted view: the forward diffusion process ``noise_steps`` along 1000 steps.

    ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` with a sigmoid beta schedule from 1e-5
    to 5e-3 (as VCD uses), applied to the processed pixel tensor. ``t = noise_steps`` indexes
    the schedule as VCD's ``noise_step`` does (``abar_t`` multiplies betas 0..t), so the
    conditions accept 1-999: 0 would ask for no noise, which this schedule cannot give.
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

    logits: torch.Tensor  # [B, V] fp32 scores of the first generated token
    probs: torch.Tensor  # [B, V] fp32
    grids: np.ndarray | None  # [B, L, H, G, G]
    image_mass: np.ndarray | None
    text_mass: np.ndarray | None
    tokens: list[list[int]] | None = None  # generated continuation (None: not generated)
    rows: dict[int, torch.Tensor] | None = None  # raw [B, H, K] rows when keep_rows
    logit_mean: np.ndarray | None = None  # [B, L, H] image-key logits (Figure 26), when recorded
    logit_max: np.ndarray | None = None


#: decoding rule name -> ``rule(engine, batch, cache, key, *, generate, record, sample_keys)``
RULES: Registry[Callable[..., _Step]] = Registry("decoding rule")


class DecodingEngine:
    """Runs several conditions over a batch with one shared prefix prefill.

    ``record`` stores the answer position's attention (grid, image and text mass) per
    condition; ``max_new_tokens`` bounds the continuation (1 = first token only).
    ``max_fused_rows`` bounds samples x settings run as one batch over the prefix cache
    (activations and suffixes grow with it; 1 runs each setting as its own pass). ``clock``
    (default ``time.perf_counter``, read after synchronising the model's GPUs) times the
    runs each condition's ``compute_seconds`` is made of (see :meth:`run`). ``share_prefix``
    lets the fused rows of a sample attend to one copy of its prefix cache
    (:mod:`vislens.shared_prefix`) instead of K repeated copies; False is the reference
    (the same arithmetic, with K copies to write and read).
    """

    def __init__(self, adapter: VLMAdapter, *, max_new_tokens: int = 16, grid: int = 24,
                 record: bool = True, attention_dtype: torch.dtype = torch.float32,
                 max_fused_rows: int = 32, clock: Callable[[], float] | None = None,
                 share_prefix: bool = True) -> None:
        if max_new_tokens < 1:
            raise VislensError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.adapter = adapter
        self.model = adapter.model
        self.max_new_tokens = max_new_tokens
        self.grid = grid
        self.record = record
        self.attention_dtype = attention_dtype  # float16 halves the device->host copy for stores
        self.max_fused_rows = max_fused_rows  # samples x settings in one pass (1: no fusing)
        self.share_prefix = share_prefix
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.forward_calls = 0
        self.clock = time.perf_counter if clock is None else clock
        self._gpus = sorted({p.device.index or 0 for p in self.model.parameters()
                             if p.device.type == "cuda"})

    def _now(self) -> float:
        """The clock once the model's queued GPU work is done (timings cover the work)."""
        for d in self._gpus:
            torch.cuda.synchronize(d)
        return self.clock()

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
        cache = self._cache_of(out)
        # sliding-window layers drop keys beyond the window on update; recording the past
        # lets each setting's step be cropped back to this prefix
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()
        return cache

    @staticmethod
    def _last(batch: PreparedBatch) -> dict[str, Any]:
        """Forward kwargs of the last prompt token (on top of the prefix cache)."""
        return dict(input_ids=batch.input_ids[:, -1:], attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids[..., -1:], use_cache=True)

    # -- decoding rules (entries of RULES) ----------------------------------------------
    def step(self, batch: PreparedBatch, cache: Any, key: SettingKey | tuple, generate: bool = False,
             keep_rows: bool = False, record: bool | None = None, **_: Any) -> _Step:
        """Greedy rule: the last prompt token under one steering setting on the prefix cache,
        then (``generate``) an unsteered greedy continuation.

        The cache is cropped back to the prefix afterwards, ready for the next setting.
        """
        key = SettingKey(*key)
        values = list(key.value) if isinstance(key.value, tuple) else [key.value] * batch.size
        ivs = interventions_for(key.kind, values, layers=key.layers, heads=key.heads)
        return self._greedy(batch, cache, ivs, generate, self.record if record is None else record,
                            keep_rows)

    def fused_steps(self, batch: PreparedBatch, cache: Any, keys: Sequence[SettingKey],
                    generate: bool = False, record: bool | None = None) -> dict[SettingKey, _Step]:
        """Greedy rule for several settings in one pass per token.

        The batch is repeated once per setting (row ``i*K + k`` is sample ``i`` under setting
        ``k``), each setting's intervention acts on its own rows, and one forward per
        generated token serves all K settings. On a GPU a decode step re-reads every weight,
        so this turns K x N weight passes into N. The prefix cache is not repeated: the K
        rows of a sample attend to its one copy (:mod:`vislens.shared_prefix`; caches of
        other layer types are repeated instead). The cache is back to the prefix of the
        original rows afterwards.
        """
        keys = [SettingKey(*k) for k in keys]
        n_set, b = len(keys), batch.size
        record = self.record if record is None else record
        if n_set == 1:
            return {keys[0]: self.step(batch, cache, keys[0], generate, record=record)}
        # one intervention per (kind, layers, heads), with each setting's values on its rows
        # (a sweep's alphas are one per-row "scale": one edit per layer, not one per setting)
        groups: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, key in enumerate(keys):
            values, rows = groups.setdefault((key.kind, key.layers, key.heads),
                                             (torch.zeros(b, n_set),
                                              torch.zeros(b, n_set, dtype=torch.bool)))
            values[:, k] = torch.as_tensor(key.value if isinstance(key.value, tuple)
                                           else [key.value] * b, dtype=torch.float32)
            rows[:, k] = True
        ivs = []
        for (kind, layers, heads), (values, rows) in groups.items():
            ivs += interventions_for(kind, values.flatten(), layers=layers, heads=heads,
                                     rows=rows.flatten())
        from . import shared_prefix  # imports transformers

        big = _repeat_rows(batch, n_set)
        if self.share_prefix and shared_prefix.eligible(cache):  # K rows per sample over one copy of the prefix
            fork = shared_prefix.fork(cache, n_set)
            with shared_prefix.armed(fork):
                st = self._greedy(big, fork, ivs, generate, record, keep_rows=False)
        else:
            cache.batch_repeat_interleave(n_set)
            try:
                st = self._greedy(big, cache, ivs, generate, record, keep_rows=False)
            finally:  # back to the original rows (the repeated copies are identical)
                # CPU indices index tensors on any device (the layers may sit on several GPUs)
                cache.batch_select_indices(torch.arange(0, b * n_set, n_set))

        def pick(x: Any, k: int) -> Any:
            return None if x is None else x[k::n_set]

        return {key: _Step(st.logits[k::n_set], st.probs[k::n_set], pick(st.grids, k),
                           pick(st.image_mass, k), pick(st.text_mass, k), pick(st.tokens, k),
                           logit_mean=pick(st.logit_mean, k), logit_max=pick(st.logit_max, k))
                for k, key in enumerate(keys)}

    def _greedy(self, batch: PreparedBatch, cache: Any, ivs: list, generate: bool, record: bool,
                keep_rows: bool) -> _Step:
        """The last prompt token under interventions ``ivs``, then the greedy continuation."""
        steerer = Steerer(batch.image_keys, interventions=ivs, record=record)
        with steerer:
            out = self._forward(**self._last(batch), **{self._cache_kw: cache})
        logits = out.logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        grids = imass = tmass = lmean = lmax = None
        if record:
            grids, imass, tmass = self.reduce_records(batch, steerer.records)
            lmean, lmax = self.reduce_logit_stats(steerer.logit_stats)
        tokens = self._continue(batch, cache, probs) if generate else None
        cache.crop(-(1 + (len(tokens[0]) - 1 if tokens else 0)))
        return _Step(logits, probs, grids, imass, tmass, tokens,
                     steerer.records if keep_rows else None, lmean, lmax)

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

    def _contrastive(self, batch: PreparedBatch, cache: Any,
                     scores: Callable[..., torch.Tensor], generate: bool, record: bool) -> _Step:
        """First-token scores, attention and optional continuation of a contrastive rule.

        ``scores(steerer, **forward_kwargs)`` runs the rule's forwards (the real-image,
        full-depth one inside ``steerer`` when given) and returns next-token scores.
        """
        steerer = Steerer(batch.image_keys, record=record)
        first = scores(steerer, **self._last(batch)).float()
        tokens = None
        if generate:
            tokens = self._decode_loop(batch, first, lambda tok, mask, pos: scores(
                None, input_ids=tok[:, None], attention_mask=mask, position_ids=pos, use_cache=True))
        cache.crop(-(len(tokens[0]) if tokens else 1))
        grids = imass = tmass = lmean = lmax = None
        if record:
            grids, imass, tmass = self.reduce_records(batch, steerer.records)
            lmean, lmax = self.reduce_logit_stats(steerer.logit_stats)
        return _Step(first, torch.softmax(first, dim=-1), grids, imass, tmass, tokens,
                     logit_mean=lmean, logit_max=lmax)

    def vcd_step(self, batch: PreparedBatch, cache: Any, key: SettingKey, generate: bool = False,
                 record: bool | None = None, sample_keys: Sequence[str] = (), **_: Any) -> _Step:
        """VCD rule: contrast the real image with its diffusion-noised view (no steering).

        The attention recorded is the real-image forward's (the unsteered row)."""
        args = dict(key.rule_args)
        noisy = PreparedBatch(**{**batch.__dict__,
                                 "vision": self._noised(batch, args, sample_keys)})
        noisy_cache = self.prefill(noisy)

        def scores(steerer: Steerer | None, **kw) -> torch.Tensor:
            with steerer if steerer is not None else _NO_STEERER:
                real = self._forward(**kw, **{self._cache_kw: cache}).logits[:, -1]
            fake = self._forward(**kw, **{self._cache_kw: noisy_cache}).logits[:, -1]
            return vcd_scores(real, fake, args["alpha"], args["beta"])

        return self._contrastive(batch, cache, scores, generate,
                                 self.record if record is None else record)

    def dola_step(self, batch: PreparedBatch, cache: Any, key: SettingKey, generate: bool = False,
                  record: bool | None = None, **_: Any) -> _Step:
        """DoLa rule: contrast the final layer with the most divergent premature layer."""
        args = dict(key.rule_args)
        cands = dola_candidates(args["premature_layers"], self.adapter.num_layers,
                                self.adapter.tied_embeddings)
        head, norm = self.model.get_output_embeddings(), self.adapter.final_norm()

        def scores(steerer: Steerer | None, **kw) -> torch.Tensor:
            with steerer if steerer is not None else _NO_STEERER:
                out = self._forward(**kw, output_hidden_states=True, **{self._cache_kw: cache})
            prem = torch.stack([head(norm(out.hidden_states[j][:, -1])) for j in cands])
            return dola_scores(out.logits[:, -1], prem, args["relative_top"])[0]

        return self._contrastive(batch, cache, scores, generate,
                                 self.record if record is None else record)

    def _noised(self, batch: PreparedBatch, args: dict[str, Any],
                sample_keys: Sequence[str]) -> dict[str, Any]:
        """The batch's pixel inputs with per-sample deterministic diffusion noise."""
        pix = batch.vision["pixel_values"]
        if "image_grid_thw" in batch.vision:  # Qwen2-VL: patches of all images concatenated
            sizes = batch.vision["image_grid_thw"].prod(-1).tolist()
        else:
            sizes = [1] * pix.shape[0]
        parts, start = [], 0
        for key, n in zip(sample_keys, sizes):
            digest = hashlib.sha256(f"{int(args['seed'])}:{key}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            parts.append(diffusion_noise(pix[start:start + n], int(args["noise_steps"]), gen))
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

    @staticmethod
    def reduce_logit_stats(stats: dict[int, tuple[torch.Tensor, torch.Tensor]]
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer image-key logit (mean, max) [B, H] -> two float32 arrays [B, L, H]."""
        layers = sorted(stats)
        return tuple(np.stack([stats[l][j].float().cpu().numpy() for l in layers], axis=1)
                     for j in (0, 1))  # type: ignore[return-value]

    # -- the public entry point ---------------------------------------------------------
    @torch.inference_mode()
    def run(self, images: Sequence[Any], questions: Sequence[str],
            options: Sequence[Sequence[str]], conditions: Sequence[Condition],
            sample_keys: Sequence[str] | None = None) -> list[dict[str, ConditionResult]]:
        """Results per sample (in input order), keyed by condition name.

        ``sample_keys`` (e.g. sample ids) seed per-sample randomness such as VCD's noise;
        they default to the questions.

        Each result's ``compute_seconds`` is what its condition would cost run alone, per
        sample: the shared work (preparing the batch and the prefix prefill), plus every
        setting run whose result it uses (the last run of each of its settings; a fused pass
        of K settings counts 1/K of its time for each; a contrastive rule's extra forwards
        are in its run), plus the unsteered confidence probe when the method decides from
        it (AdaptVis), divided by the batch size. Runs shared by several conditions count
        fully for each.
        """
        check_conditions(conditions, self.adapter.num_layers, self.adapter.num_heads)
        keys = list(sample_keys) if sample_keys is not None else list(questions)
        if len(keys) != len(images):  # VCD seeds each sample's noise with its own key
            raise VislensError(f"{len(images)} samples but {len(keys)} sample key"
                               f"{'s' if len(keys) != 1 else ''}")
        t0 = self._now()
        batch = self.adapter.prepare(images, questions)
        if len(options) != batch.size:
            raise VislensError(f"{batch.size} samples but {len(options)} option lists")
        # before decoding: an option the tokenizer cannot score is refused at no cost
        opt_ids = [self.adapter.option_token_ids(o, p) for o, p in zip(options, batch.prompts)]
        plans, steps, costs = self._plan_and_execute(batch, conditions, keys, t0)
        return self._collect(batch, opt_ids, conditions, plans, steps, costs)

    def refusals(self, images: Sequence[Any], questions: Sequence[str],
                 options: Sequence[Sequence[str]]) -> list[tuple[int, str]]:
        """The samples :meth:`run` refuses on their own, as ``(index, one-line reason)``.

        Each sample goes alone through what :meth:`run` checks before any forward (the
        processor, the prompt's image and answer positions, its options' first tokens), so
        a job can name, or skip, the sample that made a whole batch fail.
        """
        out = []
        for i, (image, question, opts) in enumerate(zip(images, questions, options)):
            try:
                batch = self.adapter.prepare([image], [question])
                self.adapter.option_token_ids(opts, batch.prompts[0])
            except VislensError as exc:
                out.append((i, str(exc)))
        return out

    def _plan_and_execute(self, batch: PreparedBatch, conditions: Sequence[Condition],
                          sample_keys: Sequence[str], t0: float
                          ) -> tuple[dict[str, Plan], dict[SettingKey, _Step], dict[str, float]]:
        """Prefill, plan every condition (probing the unsteered confidence where a method needs
        it), then run each distinct planned setting once: greedy ones fused, others alone.

        Also returns each condition's seconds for the whole batch (see :meth:`run`); ``t0``
        is the clock when the batch's work began."""
        cache = self.prefill(batch)
        shared = self._now() - t0
        gen = self.max_new_tokens > 1
        steps: dict[SettingKey, _Step] = {}
        runs: list[float] = []  # seconds of each setting run
        last_run: dict[SettingKey, int] = {}  # the run that produced steps[key]

        def ran(key: SettingKey, seconds: float) -> None:
            runs.append(seconds)
            last_run[key] = len(runs) - 1

        def ready(key: SettingKey, generate: bool = gen, record: bool = self.record) -> bool:
            st = steps.get(key)
            return st is not None and not (generate and st.tokens is None) and \
                not (record and st.grids is None)

        def need(key: SettingKey, generate: bool = gen, record: bool = self.record) -> _Step:
            if not ready(key, generate, record):
                t = self._now()
                steps[key] = RULES.get(key.rule)(self, batch, cache, key, generate=generate,
                                                 record=record, sample_keys=sample_keys)
                ran(key, self._now() - t)
            return steps[key]

        probe: list[int] = []

        def confidence() -> np.ndarray:
            # the unsteered first token only: where a condition uses the baseline as its own
            # result, its continuation and attention come with the fused pass below
            conf = need(BASELINE_KEY, False, False).probs.max(-1).values.cpu().numpy()
            probe.append(last_run[BASELINE_KEY])
            return conf

        plans = plan_conditions(conditions, batch.size, confidence)
        planned = list(dict.fromkeys(k for p in plans.values() for k in p.rows))
        # greedy settings share passes (max_fused_rows rows each); other rules run alone
        greedy = [k for k in planned if k.rule == "greedy" and not ready(k)]
        per_pass = max(1, self.max_fused_rows // batch.size)
        for start in range(0, len(greedy), per_pass):
            chunk = greedy[start:start + per_pass]
            t = self._now()
            steps.update(self.fused_steps(batch, cache, chunk, gen))
            seconds = (self._now() - t) / len(chunk)  # a fused pass: 1/K of it per setting
            for key in chunk:
                ran(key, seconds)
        for key in planned:
            need(key)
        costs = {}
        for c in conditions:
            used = {last_run[k] for k in plans[c.name].rows}
            if METHODS.get(c.method).needs_confidence:
                used.update(probe)
            costs[c.name] = shared + sum(runs[r] for r in used)
        return plans, steps, costs

    def _collect(self, batch: PreparedBatch, opt_ids: Sequence[Sequence[Sequence[int]]],
                 conditions: Sequence[Condition], plans: dict[str, Plan],
                 steps: dict[SettingKey, _Step], costs: dict[str, float]
                 ) -> list[dict[str, ConditionResult]]:
        """Each sample's result under each condition, from the step its plan names."""
        n_img = batch.image_keys.sum(-1).tolist()
        n_all = batch.attention_mask.sum(-1).tolist()
        results: list[dict[str, ConditionResult]] = [{} for _ in range(batch.size)]
        for c in conditions:
            plan = plans[c.name]
            for i, res in enumerate(results):
                r = self._result(steps[plan.rows[i]], i, opt_ids[i], plan.alpha_used[i])
                r.n_image_tokens, r.n_text_tokens = int(n_img[i]), int(n_all[i] - n_img[i])
                r.compute_seconds = costs[c.name] / batch.size
                res[c.name] = r
        return results

    def _result(self, st: _Step, i: int, opt_ids: Sequence[Sequence[int]],
                alpha: float) -> ConditionResult:
        p = st.probs[i]
        first = int(p.argmax())
        if st.tokens is not None:
            ids = [t for t in st.tokens[i] if t >= 0]
        else:
            ids = [] if first in self.adapter.eos_token_ids else [first]
        text = self.adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
        option_probs = np.array([float(p[list(ids_k)].sum()) if ids_k else 0.0
                                 for ids_k in opt_ids], dtype=np.float32)
        return ConditionResult(
            text=text, first_token=first, confidence=float(p.max()), option_probs=option_probs,
            alpha_used=float(alpha),
            image_attention=None if st.grids is None else st.grids[i],
            image_mass=None if st.image_mass is None else st.image_mass[i],
            text_mass=None if st.text_mass is None else st.text_mass[i],
            image_logit_mean=None if st.logit_mean is None else st.logit_mean[i],
            image_logit_max=None if st.logit_max is None else st.logit_max[i])


def run_leaving_out(engine: DecodingEngine, images: Sequence[Any], questions: Sequence[str],
                    options: Sequence[Sequence[str]], conditions: Sequence[Condition],
                    sample_keys: Sequence[str], refused: Callable[[int, str], None]
                    ) -> tuple[list[int], list[dict[str, ConditionResult]]]:
    """``engine.run`` on a job's batch, leaving out the samples it refuses on their own.

    When the engine refuses the batch (a :class:`VislensError`: the processor rejects one
    image, an option cannot be scored, ...), each sample ``engine.refusals`` finds is
    reported as ``refused(index, "sample KEY: reason")`` (which may raise) and the others
    run again as one batch, as if those samples had not been in it. Returns the indices
    kept and their results; an error that no single sample explains is raised as it was.
    """
    try:
        return list(range(len(images))), engine.run(images, questions, options, conditions,
                                                     sample_keys=sample_keys)
    except VislensError:
        bad = dict(engine.refusals(images, questions, options))
        if not bad:
            raise
    for i, reason in bad.items():
        refused(i, f"sample {sample_keys[i]}: {reason}")
    keep = [i for i in range(len(images)) if i not in bad]
    if not keep:
        return [], []
    return keep, engine.run([images[i] for i in keep], [questions[i] for i in keep],
                            [options[i] for i in keep], conditions,
                            sample_keys=[sample_keys[i] for i in keep])


def _repeat_rows(batch: PreparedBatch, times: int) -> PreparedBatch:
    """Each row repeated ``times`` times in place (row ``i*times + k``), for the last token and
    the decode steps (no pixels: the image is in the prefix cache)."""
    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(times, dim=-2 if t.dim() == 3 else 0)
    return PreparedBatch(input_ids=rep(batch.input_ids), attention_mask=rep(batch.attention_mask),
                         position_ids=rep(batch.position_ids), image_keys=rep(batch.image_keys),
                         vision={}, layouts=[lay for lay in batch.layouts for _ in range(times)],
                         prompts=[p for p in batch.prompts for _ in range(times)])


RULES.add("greedy", DecodingEngine.step)
RULES.add("vcd", DecodingEngine.vcd_step)
RULES.add("dola", DecodingEngine.dola_step)
_NO_STEERER = contextlib.nullcontext()


def run_conditions(adapter: VLMAdapter, images: Sequence[Any], questions: Sequence[str],
                   options: Sequence[Sequence[str]], conditions: Sequence[Condition | str], *,
                   max_new_tokens: int = 16, grid: int = 24, record: bool = True
                   ) -> list[dict[str, ConditionResult]]:
    """Convenience wrapper: parse string conditions and run one batch."""
    conds = [c if isinstance(c, Condition) else parse_condition(c) for c in conditions]
    engine = DecodingEngine(adapter, max_new_tokens=max_new_tokens, grid=grid, record=record)
    return engine.run(images, questions, options, conds)
