"""Exact, cheaper forward passes through open_clip's standard transformer towers.

A frozen CLIP's embedding reads one position of each tower, and most of the work a plain forward
does is for positions nobody reads. Two facts cut it without changing what is computed:

- **Pooled-only last block.** The embedding is pooled at one position (the class token of a ViT, the
  end-of-text token of the text tower). The last block still needs keys and values everywhere, but
  its queries, output projection and MLP only at that position: about 10/12 of one block's work.
- **Shared prefixes** (text). The text transformer is causal, so a position's hidden state depends
  only on the tokens up to it, and rows that share a prefix share those states. A caption and its
  dropped-out query agree up to the first dropped token; captions share openings ("a photo of");
  duplicate captions share everything. The batch runs as a prefix trie: every distinct prefix is one
  position, computed once, and no padding is computed at all. Attention gathers each row's keys and
  values from the trie (`prefix_trie`).

Both paths are checked against open_clip's own `encode_image` / `encode_text` on probe inputs when
the model loads (`lean_image_applies`, `lean_text_applies`); a tower that is not the standard one, or
that disagrees, is run through open_clip's methods instead. The results agree to float rounding
(about 2e-6 in float32: the same matmuls over differently shaped batches).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

TOL = 1e-5  # largest abs difference of unit-norm embeddings from open_clip's, float32
TOL_HALF = 5e-3  # the same in float16 (cuda), where rounding alone is about 1e-3

PROBE_CAPTIONS = (  # shared openings, a duplicate, an empty and a one-token caption: every trie case
    "a red circle",
    "a red circle on a blue square",
    "a small blue square at the top left of a large green triangle on a white background",
    "a red circle",
    "x",
    "",
)


def text_tower(model) -> tuple[Any, str, int | None] | None:
    """(tower, pool type, eos id) when the model has open_clip's standard causal text transformer, else None."""
    if hasattr(model, "token_embedding"):  # CLIP keeps the text tower's parts on the model itself
        tower, pool, eos = model, getattr(model, "text_pool_type", None), getattr(model, "text_eos_id", None)
    elif hasattr(getattr(model, "text", None), "token_embedding"):  # CustomTextCLIP with a TextTransformer
        tower = model.text
        pool, eos = getattr(tower, "pool_type", None), getattr(tower, "eos_id", None)
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            return None  # a trailing CLS token or a padding mask sees the padded positions
    else:
        return None  # e.g. a Hugging Face text tower
    # Causal attention only, pooled at a token that is never padding; "last" pools the padding itself.
    if getattr(tower, "attn_mask", None) is None or pool not in ("argmax", "eos", "first"):
        return None
    return tower, pool, eos


def standard_blocks(transformer) -> bool:
    """Whether every block is open_clip's `ResidualAttentionBlock` over a plain batch-first MultiheadAttention."""
    import torch  # lazy: seconds to import; query, generate and the build import this module
    from open_clip.transformer import ResidualAttentionBlock

    if not getattr(transformer, "batch_first", False) or getattr(transformer, "grad_checkpointing", False):
        return False
    for blk in getattr(transformer, "resblocks", ()):
        attn = getattr(blk, "attn", None)
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            return False
        if not isinstance(attn, torch.nn.MultiheadAttention) or not attn.batch_first:
            return False
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
            return False
        if list(blk.mlp._modules) != ["c_fc", "gelu", "c_proj"] or attn.out_proj.bias is None:
            return False
        if blk.mlp.c_fc.bias is None or blk.mlp.c_proj.bias is None:
            return False
    return len(getattr(transformer, "resblocks", ())) > 0


def prefix_trie(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One node per distinct prefix of the token rows.

    Args:
        rows: token id lists (no padding).

    Returns:
        node_token (N,): the last token of each node's prefix; node_pos (N,): its position;
        row_nodes (R, L): the node at each row position, -1 past the row's end (L = longest row).
    """
    nodes: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    positions: list[int] = []
    out = np.full((len(rows), max(map(len, rows), default=0)), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        parent = -1
        for j, token in enumerate(row):
            node = nodes.setdefault((parent, token), len(tokens))
            if node == len(tokens):
                tokens.append(token)
                positions.append(j)
            out[r, j] = parent = node
    return np.asarray(tokens, dtype=np.int64), np.asarray(positions, dtype=np.int64), out


def _heads(attn) -> tuple[int, int]:
    return attn.num_heads, attn.embed_dim // attn.num_heads


def _activate_(mlp, x):
    """The MLP's activation, in place where it is one we know (a fresh tensor costs page faults on CPU)."""
    import torch  # lazy: seconds to import; query, generate and the build import this module
    from open_clip.transformer import QuickGELU

    act = mlp.gelu
    if isinstance(act, torch.nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if isinstance(act, QuickGELU):
        return x.mul_(torch.sigmoid(1.702 * x))
    return act(x)


def _workspace(blk, n: int, like) -> dict:
    """Output buffers for one block's matmuls over `n` positions, reused by every block of a pass."""
    width, hidden = blk.attn.embed_dim, blk.mlp.c_fc.out_features
    return {"qkv": like.new_empty(n, 3 * width), "out": like.new_empty(n, width), "fc": like.new_empty(n, hidden)}


def _block_(blk, x, ws: dict, attend):
    """One block over (N, W) position states, updated in place.

    `attend` maps the (N, 3W) in-projection to the (N, W) attention output; it holds what differs
    between towers (dense patches, or trie nodes gathered into rows).
    """
    import torch  # lazy: seconds to import; query, generate and the build import this module

    attn, mlp = blk.attn, blk.mlp
    qkv = torch.addmm(attn.in_proj_bias, blk.ln_1(x), attn.in_proj_weight.t(), out=ws["qkv"])
    out = torch.addmm(attn.out_proj.bias, attend(qkv), attn.out_proj.weight.t(), out=ws["out"])
    x.add_(blk.ls_1(out))
    fc = torch.addmm(mlp.c_fc.bias, blk.ln_2(x), mlp.c_fc.weight.t(), out=ws["fc"])
    out = torch.addmm(mlp.c_proj.bias, _activate_(mlp, fc), mlp.c_proj.weight.t(), out=ws["out"])
    return x.add_(blk.ls_2(out))


def _dense_attention(B: int, L: int, heads: int, dim: int):
    """Unmasked attention over B rows of L positions laid out one after another (vision)."""
    import torch.nn.functional as F  # lazy: seconds to import; query, generate and the build import this module

    def attend(qkv):
        q, k, v = qkv.view(B, L, 3, heads, dim).permute(2, 0, 3, 1, 4)  # each (B, H, L, d)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B * L, heads * dim)

    return attend


def _trie_attention(index, mask, first_seen, heads: int, dim: int):
    """Attention of trie nodes: rows gathered by `index` (R, L), masked by `mask` (R, 1, L, L), and each
    node read back from the first row position it stands at (`first_seen`, (N,))."""
    import torch.nn.functional as F  # lazy: seconds to import; query, generate and the build import this module

    R, L = index.shape

    def attend(qkv):
        q, k, v = qkv[index].view(R, L, 3, heads, dim).permute(2, 0, 3, 1, 4)  # each (R, H, L, d)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(R * L, heads * dim)
        return o[first_seen]

    return attend


def _block_pooled(blk, x_q, kv_states, mask=None):
    """The last block at the pooled positions only.

    Args:
        x_q: (R, W) states at the pooled positions.
        kv_states: (R, L, W) states every pooled position attends over.
        mask: (R, 1, 1, L) bool, True where a key counts, or None for all.
    """
    import torch.nn.functional as F  # lazy: seconds to import; query, generate and the build import this module

    attn = blk.attn
    R, L, W = kv_states.shape
    H, d = _heads(attn)
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = F.linear(blk.ln_1(x_q), w[:W], b[:W]).view(R, H, 1, d)
    k, v = F.linear(blk.ln_1(kv_states), w[W:], b[W:]).view(R, L, 2, H, d).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(R, W)
    x = x_q + blk.ls_1(attn.out_proj(o))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def lean_encode_image(model, pixels):
    """`model.encode_image(pixels)` (unnormalized) with the last block run at the class token only.

    Only for open_clip's VisionTransformer pooled at its class token; `lean_image_applies` checks.
    """
    visual = model.visual
    x = visual._embeds(pixels).contiguous()  # (B, L, W): class token first, ln_pre applied
    B, L, W = x.shape
    blocks = visual.transformer.resblocks
    attend = _dense_attention(B, L, *_heads(blocks[0].attn))
    flat, ws = x.view(B * L, W), _workspace(blocks[0], B * L, x)
    for blk in blocks[:-1]:
        _block_(blk, flat, ws, attend)
    x = _block_pooled(blocks[-1], x[:, 0], x)  # (B, W)
    x = visual.ln_post(x)  # per token, so before or after pooling is the same
    return x @ visual.proj if visual.proj is not None else x


def row_lengths(tokens: np.ndarray) -> np.ndarray:
    """Length of each row without its trailing padding (token 0), at least 1."""
    nonzero = tokens != 0
    last = tokens.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last + 1, 1)


def _pool_positions(tokens: np.ndarray, pool: str, eos: int | None) -> np.ndarray:
    """The position `open_clip.transformer.text_global_pool` reads in each row."""
    if pool == "argmax":
        return np.argmax(tokens, axis=1)
    if pool == "eos":
        return np.argmax(tokens == eos, axis=1)
    return np.zeros(len(tokens), dtype=np.int64)  # "first"


def lean_encode_text(model, tokens, stats: dict | None = None):
    """`model.encode_text(tokens)` (unnormalized), computing each distinct prefix once.

    Args:
        model: an open_clip CLIP or CustomTextCLIP with the standard causal text transformer.
        tokens: (R, context_length) token ids, padded with 0 after the end token.
        stats: if given, "passes", "positions" (row positions without padding) and "computed" (trie
            nodes actually run) are added to it.
    """
    import torch  # lazy: seconds to import; query, generate and the build import this module

    spec = text_tower(model)
    if spec is None or len(tokens) == 0:
        raise ValueError("lean_encode_text needs open_clip's causal text transformer and at least one row")
    tower, pool, eos = spec
    device = tokens.device
    rows = tokens.cpu().numpy()
    lengths = row_lengths(rows)
    pooled_at = _pool_positions(rows, pool, eos)
    if (pooled_at >= lengths).any():
        raise ValueError("a row is pooled at a padding position")
    node_token, node_pos, row_nodes = prefix_trie([row[:n].tolist() for row, n in zip(rows, lengths, strict=True)])
    if stats is not None:
        stats["passes"] = stats.get("passes", 0) + 1
        stats["positions"] = stats.get("positions", 0) + int(lengths.sum())
        stats["computed"] = stats.get("computed", 0) + len(node_token)
    R, L = row_nodes.shape
    valid = row_nodes >= 0
    _, first_seen = np.unique(row_nodes.ravel(), return_index=True)  # sorted node ids, -1 first if present
    first_seen = first_seen[-len(node_token) :]
    causal = np.tril(np.ones((L, L), dtype=bool))
    mask = causal[None] & valid[:, None, :]  # (R, L, L): row position i sees valid keys j <= i
    pooled_nodes = row_nodes[np.arange(R), pooled_at]

    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    index = as_tensor(np.where(valid, row_nodes, 0))
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(as_tensor(node_token)).to(cast_dtype)  # (N, W)
    x = x + tower.positional_embedding[as_tensor(node_pos)].to(cast_dtype)
    blocks = tower.transformer.resblocks
    attend = _trie_attention(index, as_tensor(mask)[:, None], as_tensor(first_seen), *_heads(blocks[0].attn))
    ws = _workspace(blocks[0], len(x), x)
    for blk in blocks[:-1]:
        _block_(blk, x, ws, attend)
    pooled_mask = mask[np.arange(R), pooled_at][:, None, None, :]  # (R, 1, 1, L)
    x = _block_pooled(blocks[-1], x[as_tensor(pooled_nodes)], x[index], as_tensor(pooled_mask))  # (R, W)
    return project_text(tower, tower.ln_final(x))


def project_text(tower, pooled):
    """The text tower's output projection (a Linear or a plain matrix, as open_clip builds it), if any."""
    import torch  # lazy: seconds to import; query, generate and the build import this module

    projection = tower.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Module) else pooled @ projection


def _tolerance(model) -> float:
    import torch  # lazy: seconds to import; query, generate and the build import this module

    return TOL if next(model.parameters()).dtype == torch.float32 else TOL_HALF


def _max_diff(a, b) -> float:
    import torch.nn.functional as F  # lazy: seconds to import; query, generate and the build import this module

    return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).abs().max().item()


def matches_open_clip(what: str, ours, theirs, model, normalized: bool = True) -> bool:
    """Whether a pass agrees with open_clip's own encoder on a probe batch; a pass that raises does not apply.

    Args:
        what: the pass's name, for the log.
        ours, theirs: zero-argument callables giving the pass's and open_clip's features.
        model: the model (its precision picks the tolerance, TOL or TOL_HALF).
        normalized: compare unit-norm embeddings; False compares the raw features.
    """
    import torch  # lazy: seconds to import; query, generate and the build import this module

    try:
        with torch.inference_mode():
            a, b = ours().float(), theirs().float()
    except Exception as e:  # any mismatch of internals means the pass does not apply here
        logging.info("%s not applicable: %s", what, e)
        return False
    diff = _max_diff(a, b) if normalized else (a - b).abs().max().item()
    if diff >= _tolerance(model):
        logging.warning("%s differs from open_clip's encoder by %.2e; using open_clip's", what, diff)
    return diff < _tolerance(model)


def lean_text_applies(model, tokenizer) -> bool:
    """Whether `lean_encode_text` matches `model.encode_text` on probe captions."""
    spec = text_tower(model)
    if spec is None or not standard_blocks(spec[0].transformer):
        return False
    tokens = tokenizer(list(PROBE_CAPTIONS)).to(next(model.parameters()).device)
    return matches_open_clip(
        "lean text path", lambda: lean_encode_text(model, tokens), lambda: model.encode_text(tokens), model
    )


def lean_image_applies(model) -> bool:
    """Whether `lean_encode_image` matches `model.encode_image` on probe pixels."""
    import torch  # lazy: seconds to import; query, generate and the build import this module
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if type(visual) is not VisionTransformer or getattr(visual, "attn_pool", None) is not None:
        return False
    if getattr(visual, "pool_type", None) != "tok" or not standard_blocks(visual.transformer):
        return False
    param = next(model.parameters())
    size = visual.image_size if isinstance(visual.image_size, tuple) else (visual.image_size,) * 2
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn((3, 3, *size), generator=gen).to(param.device, param.dtype)
    return matches_open_clip(
        "lean image path", lambda: lean_encode_image(model, pixels), lambda: model.encode_image(pixels), model
    )


# ---------------------------------------------------------------------------------------------
# The sliced text pass: where only causality holds (not the prefix trie), each batch runs up to its
# longest row.


def fast_encode_text(model, tokens):
    """`model.encode_text(tokens)` computed only up to the batch's longest sequence.

    Padding comes after the end-of-text token and the attention is causal, so no kept position
    attends to a padded one: slicing the tokens, the positional embedding and the causal mask to the
    batch's length gives the same features as the 77-position pass, at a fraction of the cost.
    Only valid for open_clip's standard text transformer; `fast_text_applies` checks that.

    Args:
        model: an open_clip CLIP (or CustomTextCLIP with a TextTransformer text tower).
        tokens: (B, context_length) token ids, padded with 0.

    Returns:
        (B, embed_dim) unnormalized text features, like `encode_text`.
    """
    from open_clip.transformer import text_global_pool  # lazy: as the passes above

    spec = text_tower(model)
    if spec is None:
        raise ValueError("fast_encode_text needs open_clip's causal text transformer; use encode_text")
    tower, pool, eos = spec
    nonpad = (tokens != 0).any(dim=0).nonzero()
    length = int(nonpad.max()) + 1 if len(nonpad) else 1
    text = tokens[:, :length]  # (B, L)
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype)  # (B, L, W)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    return project_text(tower, text_global_pool(x, text, pool, eos_token_id=eos))  # (B, D)


def fast_text_applies(model, tokenizer) -> bool:
    """Whether `fast_encode_text` matches `model.encode_text` on a probe batch (raw features, max abs diff)."""
    if text_tower(model) is None:
        return False
    tokens = tokenizer(list(PROBE_CAPTIONS)).to(next(model.parameters()).device)
    return matches_open_clip(
        "fast text path",
        lambda: fast_encode_text(model, tokens),
        lambda: model.encode_text(tokens),
        model,
        normalized=False,
    )
