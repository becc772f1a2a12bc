"""The CM3 decoder's architecture and initialisation rules, and sampling (model/decoder.py, model/sample.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from model.decoder import INIT_STD, CM3Config, CM3Decoder, KVCache
from model.sample import (
    ImageSpanRule,
    _top_p,
    cd_k_scores,
    generate,
    generate_caption,
    generate_image,
    image_to_caption_prompt,
    text_to_image_prompt,
)
from schemas.vocab import BREAK, EOD, EOSS, PAD, Vocab

VOCAB = Vocab(num_sentinels=2, text_size=40, image_codes=32, tokens_per_image=8)
CONFIG = CM3Config(vocab_size=VOCAB.size, seq_len=64, n_layer=2, n_head=2, n_embd=64)


def _model(seed: int = 0) -> CM3Decoder:
    torch.manual_seed(seed)
    return CM3Decoder(CONFIG)


def test_no_biases_no_norm_parameters_no_dropout():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "bias" in n]
    assert not [n for n in names if "ln" in n]  # LayerNorm(elementwise_affine=False) owns no parameters
    assert all(not m.elementwise_affine for m in model.modules() if isinstance(m, nn.LayerNorm))
    assert not [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))


def test_initialisation_follows_cm3leon():
    model = _model()
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr()  # untied
    assert model.wpe.weight.std().item() == pytest.approx(0.0002, rel=0.1)
    for name, p in model.named_parameters():
        if name in ("lm_head.weight", "wpe.weight"):
            continue
        assert p.abs().max().item() <= 3 * INIT_STD + 1e-9, name  # truncated at 3 std
        # A normal truncated at 3 std keeps ~98.7% of its std.
        assert p.std().item() == pytest.approx(INIT_STD * 0.987, rel=0.1), name


def test_initial_loss_is_ln_vocab_and_pad_targets_are_ignored():
    model = _model()
    idx = torch.randint(VOCAB.text_start, VOCAB.size, (3, 20))
    targets = torch.randint(VOCAB.text_start, VOCAB.size, (3, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, VOCAB.size)
    assert loss.item() == pytest.approx(math.log(VOCAB.size), abs=1e-5)
    assert model(idx)[1] is None

    # Give the model opinions, then check that PAD targets and loss_mask select what is scored.
    nn.init.normal_(model.lm_head.weight, std=0.5)
    logits, _ = model(idx)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T)
    padded = targets.clone()
    padded[:, 10:] = PAD
    assert model(idx, padded)[1].item() == pytest.approx(per_token[:, :10].mean().item(), rel=1e-5)
    mask = torch.zeros_like(targets, dtype=torch.bool)
    mask[:, 5:8] = True
    assert model(idx, targets, mask)[1].item() == pytest.approx(per_token[:, 5:8].mean().item(), rel=1e-5)
    assert model(idx, targets, torch.zeros_like(mask))[1].item() == 0.0  # nothing scored: 0, not NaN


def test_attention_is_causal():
    model = _model()
    nn.init.normal_(model.lm_head.weight, std=0.5)
    idx = torch.randint(4, VOCAB.size, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % VOCAB.size
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6) and not torch.allclose(a[0, 10:], b[0, 10:])
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, CONFIG.seq_len + 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Sampling.


class ScriptedModel(nn.Module):
    """Logits from a function of the context, to check what `generate` does with them."""

    def __init__(self, fn, seq_len: int = 64) -> None:
        super().__init__()
        self.fn = fn
        self.config = CM3Config(vocab_size=VOCAB.size, seq_len=seq_len)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def forward(self, idx, targets=None):
        self.seen.append(idx[0].tolist())
        logits = torch.stack([self.fn(row.tolist()) for row in idx])  # (B, V)
        return logits.unsqueeze(1).expand(-1, idx.size(1), -1), None  # (B, T, V)


def _fixed(probs: dict[int, float]):
    logits = torch.full((VOCAB.size,), -1e9)
    for i, p in probs.items():
        logits[i] = math.log(p)
    return lambda ctx: logits


def test_allowed_range_restricts_samples():
    model = _model(1)
    nn.init.normal_(model.lm_head.weight, std=1.0)  # a model that prefers all sorts of ids
    g = torch.Generator().manual_seed(0)
    lo, hi = VOCAB.image_start, VOCAB.size
    out = generate(model, [EOD, 10, 11, BREAK], 40, temperature=1.5, allowed_range=(lo, hi), generator=g)
    assert out.shape == (40,) and ((out >= lo) & (out < hi)).all()
    free = generate(model, [EOD, 10, 11, BREAK], 40, temperature=1.5, generator=g)
    assert ((free < lo) | (free >= hi)).any()  # the restriction is what kept the ids in range


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert torch.allclose(_top_p(probs, 0.5), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    assert torch.allclose(_top_p(probs, 0.7), torch.tensor([[0.0, 0.5, 0.0, 0.3]]) / 0.8)
    assert torch.equal(_top_p(probs, 1.0), probs)
    model = ScriptedModel(_fixed({10: 0.5, 11: 0.3, 12: 0.15, 13: 0.05}))
    g = torch.Generator().manual_seed(0)
    assert set(generate(model, [EOD], 200, top_p=0.7, generator=g).tolist()) == {10, 11}
    assert set(generate(model, [EOD], 300, top_p=1.0, generator=g).tolist()) == {10, 11, 12, 13}
    assert set(generate(model, [EOD], 5, temperature=0.0).tolist()) == {10}  # greedy


def test_classifier_free_guidance_mixes_two_streams():
    caption = 20

    def fn(ctx):
        # Conditioned on the caption the model slightly prefers 51 over 50; unconditioned, it strongly
        # prefers 50. Guidance amplifies the difference: uncond + 3 * (cond - uncond) picks 51.
        probs = {50: 0.45, 51: 0.55} if caption in ctx else {50: 0.9, 51: 0.1}
        return _fixed(probs)(ctx)

    model = ScriptedModel(fn)
    cond, uncond = [EOD, caption, BREAK], [EOD, VOCAB.sentinel(0), BREAK]
    assert generate(model, cond, 1, temperature=0.0).tolist() == [51]
    model = ScriptedModel(fn)
    out = generate(model, cond, 3, temperature=0.0, cfg_scale=3.0, uncond_prompt_ids=uncond)
    assert out.tolist() == [51, 51, 51]
    # Both streams were fed the sampled tokens.
    assert model.seen[-2] == cond + [51, 51] and model.seen[-1] == uncond + [51, 51]
    # Scale 0 is the unconditional stream alone.
    alone = generate(ScriptedModel(fn), cond, 1, temperature=0.0, cfg_scale=0.0, uncond_prompt_ids=uncond)
    assert alone.tolist() == [50]
    with pytest.raises(ValueError, match="uncond"):
        generate(model, cond, 1, cfg_scale=2.0)


def test_text_to_image_and_caption_prompts():
    caption = [VOCAB.text_start + 3, VOCAB.text_start + 7]
    p = text_to_image_prompt(VOCAB, caption)
    assert p.ids == [EOD, *caption, BREAK] and p.uncond_ids == [EOD, VOCAB.sentinel(0), BREAK]
    assert p.allowed_range == (VOCAB.image_start, VOCAB.size) and p.max_new_tokens == VOCAB.tokens_per_image
    with pytest.raises(ValueError):
        text_to_image_prompt(VOCAB, [VOCAB.image_start])  # image ids are not a caption

    image = [VOCAB.image_start + i for i in range(VOCAB.tokens_per_image)]
    q = image_to_caption_prompt(VOCAB, image)
    s0 = VOCAB.sentinel(0)
    assert q.ids == [EOD, s0, BREAK, *image, EOD, s0] and q.stop_token == EOSS
    assert q.allowed_range == (VOCAB.text_start, VOCAB.image_start)


def test_generate_image_and_caption_end_to_end():
    model = _model(2)
    nn.init.normal_(model.lm_head.weight, std=1.0)
    decoded = []
    codes, image = generate_image(
        model, VOCAB, [VOCAB.text_start + 1], decode_image=lambda c: decoded.append(c) or "img", cfg_scale=2.0
    )
    assert image == "img" and codes.shape == (VOCAB.tokens_per_image,)
    assert ((codes >= 0) & (codes < VOCAB.image_codes)).all() and decoded[0] is codes

    # A caption stops at <eoss>, which is dropped; only text ids come out.
    script = [VOCAB.text_start + 5, VOCAB.text_start + 6, EOSS, VOCAB.text_start + 9]
    prompt_len = len(image_to_caption_prompt(VOCAB, [VOCAB.image_start]).ids)

    def fn(ctx):
        return _fixed({script[min(len(ctx) - prompt_len, len(script) - 1)]: 1.0})(ctx)

    assert generate_caption(ScriptedModel(fn), VOCAB, [VOCAB.image_start]) == script[:2]


def test_generation_stops_rows_independently_and_crops_the_context():
    def fn(ctx):
        return _fixed({EOSS: 0.9, 30: 0.1} if ctx[0] == 5 else {30: 1.0})(ctx)

    model = ScriptedModel(fn, seq_len=6)
    out = generate(model, torch.tensor([[5, 6], [7, 6]]), 6, temperature=0.0, stop_token=EOSS)
    assert out[0].tolist() == [EOSS] + [PAD] * 5 and out[1].tolist() == [30] * 6
    assert max(len(s) for s in model.seen) == 6  # never more context than the learned positions


def _random_model(seed: int = 0) -> CM3Decoder:
    model = _model(seed)
    nn.init.normal_(model.lm_head.weight, std=1.0)  # the zero output layer would make every logit equal
    for block in model.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=0.3)
    return model.eval()


def test_cached_and_uncached_logits_are_equal_with_a_batch():
    model = _random_model()
    idx = torch.randint(0, VOCAB.size, (3, 20))
    full, _ = model(idx)  # (B, T, V)
    cache = KVCache(model.config, 3, 20)
    prefill, _ = model(idx[:, :7], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
    cached = torch.cat([prefill, *steps], dim=1)
    assert cache.pos == 20
    # float32 rounding only: logits reach ~30 here, the largest difference is ~3e-5 (1e-6 relative).
    assert torch.allclose(cached, full, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(full[:, 1:], full[:, :-1], atol=1e-3)  # the logits vary with position
    with pytest.raises(ValueError, match="full"):
        model(idx[:, :1], cache=cache)


def test_generate_with_cache_matches_without():
    model = _random_model(1)
    prompt = torch.randint(0, VOCAB.size, (2, 5))
    uncond = torch.randint(0, VOCAB.size, (1, 3))
    kw = dict(temperature=0.0, cfg_scale=2.0, uncond_prompt_ids=uncond)
    assert torch.equal(generate(model, prompt, 12, **kw), generate(model, prompt, 12, use_cache=False, **kw))


def test_cd_k_picks_what_the_formula_says():
    # p_cond: a .5, b .3, c .15, d .05; p_uncond: a .7, b .1, c .05, d .15. k=2, alpha=.4: the
    # threshold is .4 * .3 = .12, so a, b, c pass and d does not. Scores log(pc/pu): a -.34, b 1.10,
    # c 1.10 (c ties b); d would score -1.10 but is excluded anyway. With alpha .6 (threshold .18) c drops.
    pc = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    pu = torch.log(torch.tensor([[0.7, 0.1, 0.05, 0.15]]))
    s = cd_k_scores(pc, pu, k=2, alpha=0.4)
    assert torch.isinf(s[0, 3]) and torch.allclose(s[0, :3], torch.log(torch.tensor([0.5 / 0.7, 3.0, 3.0])))
    s = cd_k_scores(pc, pu, k=2, alpha=0.6)
    assert torch.isinf(s[0, 2:]).all() and int(s.argmax()) == 1
    # k=1, alpha=1: only the conditional argmax survives.
    assert torch.isfinite(cd_k_scores(pc, pu, 1, 1.0)).sum() == 1
    # Through generate on a scripted model: CD-K picks b where plain (and CFG-free) greedy picks a.
    a, b, c, d = 50, 51, 52, 53
    cond_p, uncond_p = {a: 0.5, b: 0.3, c: 0.15, d: 0.05}, {a: 0.7, b: 0.1, c: 0.15, d: 0.05}

    def fn(ctx):
        return _fixed(cond_p if 20 in ctx else uncond_p)(ctx)

    cond, unc = [EOD, 20, BREAK], [EOD, VOCAB.sentinel(0), BREAK]
    assert generate(ScriptedModel(fn), cond, 1, temperature=0.0).tolist() == [a]
    got = generate(ScriptedModel(fn), cond, 1, temperature=0.0, uncond_prompt_ids=unc, cd_k=2, cd_alpha=0.4)
    assert got.tolist() == [b]


def test_image_span_has_exactly_tokens_per_image_then_break():
    model = _random_model(2)
    rule = ImageSpanRule(VOCAB, 4, in_image=True)
    g = [torch.Generator().manual_seed(s) for s in range(4)]
    out = generate(model, torch.full((4, 3), EOD), VOCAB.tokens_per_image + 4, rule=rule, generator=g)
    is_img = (out >= VOCAB.image_start) & (out < VOCAB.size)
    assert (is_img.sum(dim=1) == VOCAB.tokens_per_image).all()
    assert is_img[:, : VOCAB.tokens_per_image].all() and (out[:, VOCAB.tokens_per_image] == BREAK).all()
    # Without the rule the same model draws non-image ids inside the span.
    free = generate(model, torch.full((4, 3), EOD), VOCAB.tokens_per_image, generator=g)
    assert not ((free >= VOCAB.image_start) & (free < VOCAB.size)).all()


def test_the_same_seed_gives_the_same_image_whatever_the_batch():
    model = _random_model(3)
    caption = [VOCAB.text_start + 1, VOCAB.text_start + 2]
    a, _ = generate_image(model, VOCAB, caption, generator=torch.Generator().manual_seed(7))
    b, _ = generate_image(model, VOCAB, caption, generator=torch.Generator().manual_seed(7))
    c, _ = generate_image(model, VOCAB, caption, generator=torch.Generator().manual_seed(8))
    assert (a == b).all() and not (a == c).all()
    # Per-row generators: row 1 seeded 7 equals the single run seeded 7.
    p = text_to_image_prompt(VOCAB, caption)
    gens = [torch.Generator().manual_seed(s) for s in (5, 7)]
    rows = generate(
        model, torch.tensor([p.ids] * 2), p.max_new_tokens, 1.0, 0.9, 3.0, p.uncond_ids, p.allowed_range, generator=gens
    )
    assert (rows[1].numpy() - VOCAB.image_start == a).all()
