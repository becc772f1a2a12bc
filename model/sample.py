"""Sampling from a trained CM3 decoder: text → image and image → caption, as CM3Leon prompts them.

- Text to image: the prompt is `<eod> T <break>` (after any retrieved documents, laid out as the
  build lays out training sequences) and the model continues with `tokens_per_image` image tokens,
  drawn only from the image-code range. Classifier-free guidance (CM3Leon, section 3.1) runs two
  streams, the conditional prompt and an unconditional one whose caption is replaced by a mask
  token (what a fully masked caption looks like in CM3 training) and which keeps the retrieved
  documents (RA-CM3: the unconditional stream is the retrieved documents without the caption),
  feeds both the same sampled token, and samples from `logits_uncond + scale * (logits_cond - logits_uncond)`.
- Image to caption: CM3's infilling form `<eod> <sentinel:0> <break> I <eod> <sentinel:0>`: the
  caption was masked in place and the model writes the span out after the layout, until `<eoss>`.

Ids are global (`schemas.vocab.Vocab`). Decoding image codes to pixels is the image tokenizer's
job; `generate_image` takes it as a callable so this module does not depend on the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.decoder import CM3Decoder, KVCache
from schemas.vocab import BREAK, EOD, EOSS, PAD, Vocab
from transforms.lib.layout import Doc, layout


@dataclass(frozen=True)
class Prompt:
    """What to feed `generate` for one task."""

    ids: list[int]  # the conditional prompt
    uncond_ids: list[int] | None  # the unconditional stream for classifier-free guidance
    allowed_range: tuple[int, int] | None  # [start, stop) of the ids that may be sampled
    max_new_tokens: int  # tokens to generate at most
    stop_token: int | None  # ends a row early (always allowed)
    dropped: tuple[int, ...] = ()  # retrieved documents left out for length (indices into those given)


def _filter(logits: torch.Tensor, allowed_range: tuple[int, int] | None, stop_token: int | None) -> torch.Tensor:
    """Set every id outside allowed_range (except stop_token) to -inf."""
    if allowed_range is None:
        return logits
    keep = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)  # (V,)
    keep[allowed_range[0] : allowed_range[1]] = True
    if stop_token is not None:
        keep[stop_token] = True
    return logits.masked_fill(~keep, float("-inf"))  # (B, V)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable ids whose mass first reaches top_p, renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
    # Drop an id when the mass before it already reaches top_p; the most probable id always stays.
    drop = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # (B, V)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)  # (B, V)
    return probs / probs.sum(dim=-1, keepdim=True)


def _as_batch(ids: Any, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long, device=device)
    return t.unsqueeze(0) if t.dim() == 1 else t  # (B, T)


def cd_k_scores(logits_cond: torch.Tensor, logits_uncond: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """CM3Leon's contrastive decoding, CD-K (section 3.1): the scores to sample from.

    score(t) = log p_cond(t) - log p_uncond(t) over the tokens whose conditional probability is at
    least alpha times the k-th largest conditional probability; every other token gets -inf. The
    most probable conditional token always passes, so a row never ends up with nothing to sample.

    Args:
        logits_cond: (B, V) logits of the conditional (expert) stream, already masked.
        logits_uncond: (B, V) logits of the unconditional (amateur) stream.
        k: rank of the reference probability (1 is plain contrastive decoding's max).
        alpha: fraction of the k-th largest probability a token needs.
    """
    logp_c = torch.log_softmax(logits_cond.float(), dim=-1)  # (B, V)
    logp_u = torch.log_softmax(logits_uncond.float(), dim=-1)  # (B, V)
    k = max(1, min(int(k), logp_c.size(-1)))
    kth = logp_c.topk(k, dim=-1).values[:, -1:]  # (B, 1)
    keep = torch.isfinite(logp_c)  # (B, V): masked tokens never pass
    if alpha > 0:
        keep &= logp_c >= kth + math.log(alpha)
    return (logp_c - logp_u).masked_fill(~keep, float("-inf"))


class ImageSpanRule:
    """Image tokens only inside an image span, and the span closed after exactly `tokens_per_image`.

    Per row it counts the image tokens emitted; while a span is open only image codes may be drawn,
    at `tokens_per_image` the only allowed token is `<break>` (which closes the span), and outside a
    span image codes are forbidden. Call `mask` before sampling and `update` with the drawn tokens.
    """

    def __init__(self, vocab: Vocab, batch_size: int, in_image: bool, device: torch.device | None = None) -> None:
        self.lo, self.hi, self.tpi = vocab.image_start, vocab.size, vocab.tokens_per_image
        self.in_image = torch.full((batch_size,), in_image, dtype=torch.bool, device=device)  # (B,)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self._masks: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def _id_masks(self, V: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(is_image, only_break), each (V,): built once, not on every step."""
        if self._masks is None or self._masks[:2] != (V, device):
            ids = torch.arange(V, device=device)
            self._masks = (V, device, (ids >= self.lo) & (ids < self.hi), ids == BREAK)
        return self._masks[2], self._masks[3]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        is_image, only_break = self._id_masks(logits.size(-1), logits.device)  # (V,), (V,)
        full = self.in_image & (self.count >= self.tpi)  # (B,)
        allowed = torch.where(self.in_image.unsqueeze(1), is_image.unsqueeze(0), ~is_image.unsqueeze(0))  # (B, V)
        allowed = torch.where(full.unsqueeze(1), only_break.unsqueeze(0), allowed)
        return logits.masked_fill(~allowed, float("-inf"))

    def update(self, nxt: torch.Tensor) -> None:
        nxt = nxt.view(-1)
        closing = self.in_image & (nxt == BREAK)
        self.count = torch.where(self.in_image & (nxt >= self.lo) & (nxt < self.hi), self.count + 1, self.count)
        self.in_image = self.in_image & ~closing
        self.count = torch.where(closing, torch.zeros_like(self.count), self.count)


def _draw(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One id per row; a list of generators seeds each row by itself (same seed, same sample)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generator)])


class _Stream:
    """One guidance stream: its context and, where the model has one and the run fits, a KV cache."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, total: int, use_cache: bool) -> None:
        self.model, self.ids = model, ids  # (B, T)
        self.cache = None
        if use_cache and isinstance(model, CM3Decoder) and total <= model.config.seq_len:
            p = next(model.parameters())
            self.cache = KVCache(model.config, ids.size(0), total, device=p.device, dtype=p.dtype)

    def logits(self) -> torch.Tensor:
        if self.cache is None:
            # Without a cache the whole context is recomputed per token; crop it to the learned positions.
            logits, _ = self.model(self.ids[:, -self.model.config.seq_len :])  # (B, T, V)
        else:
            logits, _ = self.model(self.ids[:, self.cache.pos :], cache=self.cache)  # (B, T_new, V)
        return logits[:, -1, :].float()  # (B, V)

    def push(self, nxt: torch.Tensor) -> None:
        self.ids = torch.cat([self.ids, nxt], dim=1)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Any,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    cfg_scale: float = 1.0,
    uncond_prompt_ids: Any = None,
    allowed_range: tuple[int, int] | None = None,
    stop_token: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    cd_k: int | None = None,
    cd_alpha: float = 0.1,
    rule: ImageSpanRule | None = None,
    use_cache: bool = True,
    on_token: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Sample a continuation of the prompt.

    Args:
        model: a `CM3Decoder` (anything whose forward(idx) returns (logits, _) and has config.seq_len).
        prompt_ids: (T,) or (B, T) ids.
        max_new_tokens: tokens to generate at most.
        temperature: divides the logits; 0 picks the most probable id (greedy).
        top_p: nucleus sampling mass; 1 keeps every id.
        cfg_scale: classifier-free guidance scale; 1 samples the conditional stream alone.
        uncond_prompt_ids: (T',) or (B, T') ids of the unconditional stream; required when cfg_scale
            != 1 or cd_k is set.
        allowed_range: [start, stop) ids that may be sampled (e.g. the image codes); None allows all.
        stop_token: a row that samples it is finished (the token is kept, later ones are PAD).
        generator: seeds the sampling; a list of B generators seeds each row by itself.
        cd_k: CD-K contrastive decoding (`cd_k_scores`) with this k; None samples the (guided) logits.
        cd_alpha: CD-K's alpha.
        rule: an `ImageSpanRule` applied before each draw and updated after it.
        use_cache: keep a KV cache per stream (a `CM3Decoder` whose positions hold the whole run).
        on_token: called with the number of tokens generated so far after each step (progress).

    Returns:
        (max_new_tokens,) or (B, max_new_tokens) new ids (fewer columns when every row stopped early).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    cond_ids = _as_batch(prompt_ids, device)  # (B, T)
    guided = cfg_scale != 1.0 or cd_k is not None
    if guided and uncond_prompt_ids is None:
        raise ValueError("cfg_scale != 1 or cd_k needs uncond_prompt_ids")
    cond = _Stream(model, cond_ids, cond_ids.size(1) + max_new_tokens, use_cache)
    if guided:
        u_ids = _as_batch(uncond_prompt_ids, device).expand(cond_ids.size(0), -1)  # (B, T')
        uncond = _Stream(model, u_ids, u_ids.size(1) + max_new_tokens, use_cache)
    done = torch.zeros(cond_ids.size(0), dtype=torch.bool, device=device)  # (B,)
    out = []
    for _ in range(max_new_tokens):
        logits = cond.logits()  # (B, V)
        if guided:
            u = uncond.logits()  # (B, V)
            if cfg_scale != 1.0:
                logits = u + cfg_scale * (logits - u)
        logits = _filter(logits, allowed_range, stop_token)
        if rule is not None:
            logits = rule.mask(logits)
        if cd_k is not None:
            logits = cd_k_scores(logits, u, cd_k, cd_alpha)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            probs = _top_p(torch.softmax(logits / temperature, dim=-1), top_p)  # (B, V)
            nxt = _draw(probs, generator)  # (B, 1)
        nxt = nxt.masked_fill(done.unsqueeze(1), PAD)
        if rule is not None:
            rule.update(nxt)
        out.append(nxt)
        cond.push(nxt)
        if guided:
            uncond.push(nxt)  # both streams continue with the same token
        if on_token is not None:
            on_token(len(out))
        if stop_token is not None:
            done |= nxt.squeeze(1) == stop_token
            if bool(done.all()):
                break
    model.train(was_training)
    new = torch.cat(out, dim=1) if out else cond_ids.new_zeros(cond_ids.size(0), 0)  # (B, n)
    return new[0] if torch.as_tensor(prompt_ids).dim() == 1 else new


def _check_range(ids: Sequence[int], start: int, stop: int, what: str) -> list[int]:
    ids = [int(i) for i in ids]
    if any(not start <= i < stop for i in ids):
        raise ValueError(f"{what} ids must lie in [{start}, {stop}) (global ids, see schemas.vocab)")
    return ids


def _laid_out(vocab: Vocab, neighbours: Sequence[Any], query: Any, seq_len: int | None, reserve: int):
    """The build's layout of the retrieved documents and the query, its closing `<eod>` dropped."""
    docs = [Doc(n.text_ids, n.image_ids) for n in neighbours]
    lay = layout(docs, query, seq_len if seq_len is not None else 2**62, reserve=reserve, vocab=vocab)
    kept = [n for i, n in enumerate(neighbours) if i not in lay.dropped]
    return lay.tokens[:-1].tolist(), kept, lay.dropped


def text_to_image_prompt(
    vocab: Vocab, caption_ids: Sequence[int], neighbours: Sequence[Any] = (), seq_len: int | None = None
) -> Prompt:
    """`<eod> T1 <break> I1 <break> ... T <break>`, then `tokens_per_image` image codes.

    The retrieved documents come first, laid out as the build lays out a training sequence
    (`transforms.lib.layout.layout`). The guidance stream is RA-CM3's unconditional one: the same retrieved
    documents with the caption masked (`<sentinel:0>` where the caption stood), so guidance pushes
    towards the caption, not away from the documents. With no documents the two streams are
    `<eod> T <break>` and `<eod> <sentinel:0> <break>`.

    Args:
        vocab: the corpus's id space.
        caption_ids: the caption in global text ids.
        neighbours: retrieved documents in sequence order (each with `text_ids`, `image_ids`).
        seq_len: the model's positions; documents are dropped from the first one on to leave room
            for the image, as the build drops them for length.
    """
    caption = _check_range(caption_ids, vocab.text_start, vocab.image_start, "caption")
    tpi = vocab.tokens_per_image
    ids, kept, dropped = _laid_out(vocab, neighbours, Doc(caption, None), seq_len, tpi)
    uncond, _, _ = _laid_out(vocab, kept, Doc([vocab.sentinel(0)], None), seq_len, tpi)
    return Prompt(
        ids=[*ids, BREAK],
        uncond_ids=[*uncond, BREAK],
        allowed_range=(vocab.image_start, vocab.size),
        max_new_tokens=tpi,
        stop_token=None,
        dropped=tuple(dropped),
    )


def image_to_caption_prompt(
    vocab: Vocab,
    image_ids: Sequence[int],
    max_new_tokens: int = 64,
    neighbours: Sequence[Any] = (),
    seq_len: int | None = None,
) -> Prompt:
    """CM3 infilling: `<eod> docs... <sentinel:0> <break> I <eod> <sentinel:0>`, then text until `<eoss>`.

    The guidance stream (used only when asked for) is the retrieved documents with the image masked.
    """
    image = _check_range(image_ids, vocab.image_start, vocab.size, "image")
    s0 = vocab.sentinel(0)
    reserve = max_new_tokens + 2  # the closing <eod> is dropped; <sentinel:0> and the text follow
    ids, kept, dropped = _laid_out(vocab, neighbours, Doc([s0], image), seq_len, reserve)
    uncond, _, _ = _laid_out(vocab, kept, Doc([s0], None), seq_len, reserve)
    return Prompt(
        ids=[*ids, EOD, s0],
        uncond_ids=[*uncond, EOD, s0],
        allowed_range=(vocab.text_start, vocab.image_start),
        max_new_tokens=max_new_tokens,
        stop_token=EOSS,
        dropped=tuple(dropped),
    )


def generate_image(
    model: torch.nn.Module,
    vocab: Vocab,
    caption_ids: Sequence[int],
    decode_image: Callable[[np.ndarray], Any] | None = None,
    cfg_scale: float = 3.0,
    temperature: float = 1.0,
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, Any]:
    """Sample one image for a caption.

    Args:
        model: the trained decoder.
        vocab: the corpus's id space.
        caption_ids: the caption in global text ids.
        decode_image: the image tokenizer's decoder, codes (tokens_per_image,) in [0, image_codes)
            → PIL.Image; None returns no image.
        cfg_scale: classifier-free guidance scale.
        temperature: sampling temperature.
        top_p: nucleus mass.
        generator: seeds the sampling.

    Returns:
        (codes (tokens_per_image,) int64 in [0, image_codes), the decoded image or None).
    """
    p = text_to_image_prompt(vocab, caption_ids)
    new = generate(
        model,
        p.ids,
        p.max_new_tokens,
        temperature,
        top_p,
        cfg_scale,
        p.uncond_ids,
        p.allowed_range,
        generator=generator,
    )
    codes = new.cpu().numpy() - vocab.image_start
    return codes, (decode_image(codes) if decode_image is not None else None)


def generate_caption(
    model: torch.nn.Module,
    vocab: Vocab,
    image_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Caption an image by infilling; returns global text ids, `<eoss>` dropped (greedy by default)."""
    p = image_to_caption_prompt(vocab, image_ids, max_new_tokens)
    new = generate(
        model,
        p.ids,
        p.max_new_tokens,
        temperature,
        top_p,
        allowed_range=p.allowed_range,
        stop_token=p.stop_token,
        generator=generator,
    ).tolist()
    return new[: new.index(EOSS)] if EOSS in new else new


__all__ = [
    "ImageSpanRule",
    "Prompt",
    "cd_k_scores",
    "generate",
    "generate_caption",
    "generate_image",
    "image_to_caption_prompt",
    "text_to_image_prompt",
]
