"""The CM3 decoder: a compact decoder-only transformer with CM3Leon's architecture rules.

CM3Leon (arXiv 2309.02591, section 2.2): no bias terms, no dropout, layer norms without learnable
parameters, learned absolute positions initialised with std 0.0002, all other weights drawn from a
truncated normal (std 0.006, cut at 3 std) and the output layer initialised to zero, so a fresh
model predicts the uniform distribution and its first loss is exactly ln(vocab_size).

The CM3 objective needs nothing special here: the corpus already holds the masked-and-rearranged
sequences (spans moved to the end behind their sentinels), so training is plain next-token
prediction over every non-pad token, sentinels and `<eoss>` included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from schemas.vocab import PAD

INIT_STD = 0.006  # CM3Leon: truncated normal std for every weight but the positions and the output layer
POS_INIT_STD = 0.0002  # CM3Leon: learned absolute position embeddings


@dataclass
class CM3Config:
    vocab_size: int = 78  # Vocab.size of the corpus (specials + sentinels + text + image codes)
    seq_len: int = 128  # longest context; the learned positions have this many rows
    n_layer: int = 2  # transformer blocks
    n_head: int = 2  # attention heads; n_embd must divide by it
    n_embd: int = 64  # model width


def _layer_norm(n_embd: int) -> nn.LayerNorm:
    # CM3Leon removes the learnable scale and shift (and so their bias) from every layer norm.
    return nn.LayerNorm(n_embd, elementwise_affine=False)


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to `max_len`.

    With it, a decoding step feeds only the new token(s): attention reads the cached keys and values
    and the learned position of a new token is `pos` (the count cached before it), so one token costs
    one position instead of the whole context. `pos` advances after the whole forward has run.
    """

    def __init__(self, config: CM3Config, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> None:
        self.max_len = min(max_len or config.seq_len, config.seq_len)
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, self.max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype or torch.float32)  # (L, B, nh, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype or torch.float32)  # (L, B, nh, max_len, hs)
        self.pos = 0  # positions already cached
        self._pending = 0  # positions stored by the forward in flight

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nh, T, hs) keys and values; return all cached so far, (B, nh, pos+T, hs)."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions exceed max_len {self.max_len}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        self._pending = T
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self) -> None:
        self.pos += self._pending
        self._pending = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CM3Config) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"n_embd {config.n_embd} does not divide into {config.n_head} heads")
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is None or cache.pos == 0:
            if cache is not None:
                cache.store(layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        else:
            # The new positions attend to everything cached plus themselves (causally among themselves).
            k, v = cache.store(layer, k, v)  # (B, nh, P+T, hs)
            P = k.size(2) - T
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)  # (T, P+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, config: CM3Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: CM3Config) -> None:
        super().__init__()
        self.ln_1 = _layer_norm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _layer_norm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class CM3Decoder(nn.Module):
    """Decoder-only transformer over the corpus's id space (`schemas.vocab.Vocab`)."""

    def __init__(self, config: CM3Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.seq_len, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = _layer_norm(config.n_embd)
        # Not tied to wte: a zero output layer tied to the embedding would zero the inputs as well.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """CM3Leon's initialisation (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=INIT_STD, a=-3 * INIT_STD, b=3 * INIT_STD)
        nn.init.normal_(self.wpe.weight, std=POS_INIT_STD)
        nn.init.zeros_(self.lm_head.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position and, given targets, the mean next-token loss.

        Args:
            idx: (B, T) input ids, T <= seq_len.
            targets: (B, T) the ids that follow each input position; PAD targets are not scored.
            loss_mask: (B, T) bool, optional: score only the targets where it is True (and not PAD),
                e.g. the query's own tokens (`model.data.query_token_loss_mask`).
            cache: a `KVCache`; idx then holds only the positions after those already cached, and
                the cache is extended by them.

        Returns:
            (logits (B, T, V), loss) with loss None when no targets are given. With targets, the
            logits are float32 whatever the autocast dtype, as the loss needs.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds seq_len {self.config.seq_len}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)  # (B, T, C)
        if cache is not None:
            cache.advance()
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        logits = logits.float()
        scored = targets != PAD  # (B, T)
        if loss_mask is not None:
            scored = scored & loss_mask.bool()
        # Ignored targets are set to -100 rather than indexed out, so shapes stay static for compile.
        tgt = torch.where(scored, targets, torch.full_like(targets, -100))  # (B, T)
        loss_sum = F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1), ignore_index=-100, reduction="sum")
        # Divided by the count rather than reduction="mean", so a batch with nothing to score gives 0, not NaN.
        return logits, loss_sum / scored.sum().clamp(min=1)


def initial_loss(vocab_size: int) -> float:
    """The loss of a freshly initialised decoder: uniform predictions over the vocabulary."""
    return math.log(vocab_size)


__all__ = ["CM3Config", "CM3Decoder", "KVCache", "initial_loss"]
