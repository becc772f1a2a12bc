"""The shard loader and the trainer, on tiny synthetic shards written here (model.data.write_synthetic_corpus)."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from model.data import (
    SYNTHETIC_VOCAB,
    _shard_order,
    decode_tokens,
    expand_shards,
    find_vocab,
    query_token_loss_mask,
    shard_loader,
    split_eval,
    synthetic_sample,
    write_synthetic_corpus,
)
from model.train import CKPT, METRICS, TrainConfig, load_checkpoint, main, train
from schemas.vocab import EOD, PAD, Vocab

TINY = {"seq_len": 64, "n_layer": 2, "n_head": 2, "n_embd": 64, "batch_size": 8}  # ~110k params


def _write_tagged_shards(directory, lengths_per_shard: list[list[int]]) -> list[str]:
    """Shards whose sample j of shard s is `<eod> s j s j ...` of the given length: the batch tells its origin."""
    paths = []
    for s, lengths in enumerate(lengths_per_shard):
        path = directory / f"cm3-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for j, n in enumerate(lengths):
                tokens = np.array([EOD] + [10 + s, 20 + j] * ((n - 1) // 2) + [10 + s] * ((n - 1) % 2), np.int32)
                for name, data in ((f"k{s}x{j:03d}.json", b"{}"), (f"k{s}x{j:03d}.tokens.npy", _npy(tokens))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _config(tmp_path, corpus, name: str, **overrides) -> TrainConfig:
    fields = {
        "shards": str(corpus / "shards" / "cm3-{000000..000003}.tar"),
        "output": str(tmp_path / name),
        "max_steps": 10,
        "lr": 3e-3,
        "warmup_steps": 3,
        "eval_every": 5,
        "eval_batches": 2,
        "ckpt_every": 5,
        "log_every": 5,
        "device": "cpu",
        **TINY,
    }
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_synthetic_corpus(str(out), num_shards=4, samples_per_shard=48, seed=0)
    return out


# ---------------------------------------------------------------------------------------------
# Shard lists and samples.


def test_expand_shards_braces_globs_and_eval_split(corpus):
    shards = corpus / "shards"
    braces = expand_shards(str(shards / "cm3-{000000..000003}.tar"))
    assert braces == expand_shards(str(shards / "cm3-*.tar")) == sorted(braces)
    assert len(braces) == 4
    assert expand_shards(f"{braces[1]}::{braces[0]}") == braces[:2]
    with pytest.raises(FileNotFoundError):
        expand_shards(str(shards / "nothing-*.tar"))
    assert split_eval(braces) == (braces[:3], braces[3:])  # the last shard held out by default
    assert split_eval(braces, "none") == (braces, [])
    assert split_eval(braces, str(shards / "cm3-00000{0,1}.tar")) == (braces[2:], braces[:2])
    assert find_vocab(braces) == SYNTHETIC_VOCAB  # tokenizers/vocab.json beside shards/


def test_default_evaluation_is_the_builds_heldout_shards(corpus, tmp_path):
    import shutil

    source = expand_shards(str(corpus / "shards" / "cm3-*.tar"))
    (tmp_path / "shards" / "heldout").mkdir(parents=True)
    for url in source[:3]:
        shutil.copy(url, tmp_path / "shards")
    shutil.copy(source[3], tmp_path / "shards" / "heldout")
    train_urls = expand_shards(str(tmp_path / "shards" / "cm3-*.tar"))
    heldout = [str(tmp_path / "shards" / "heldout" / source[3].rsplit("/", 1)[1])]
    assert split_eval(train_urls) == (train_urls, heldout)  # all training shards train; heldout/ evaluates
    assert split_eval(train_urls, "none") == (train_urls, [])
    assert split_eval(train_urls, train_urls[0]) == (train_urls[1:], train_urls[:1])  # explicit wins


def test_decode_tokens_refuses_pickles_and_out_of_vocab_ids():
    assert decode_tokens(_npy(np.array([1, 5, 2], np.int32))).tolist() == [1, 5, 2]
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_tokens(buf.getvalue())
    with pytest.raises(ValueError, match="1-D integer"):
        decode_tokens(_npy(np.zeros((2, 2), np.int32)))
    with pytest.raises(ValueError, match="outside"):
        decode_tokens(_npy(np.array([1, 99], np.int32)), vocab_size=78)


def test_query_token_loss_mask_follows_spans_to_the_end():
    rng = np.random.default_rng(0)
    vocab = SYNTHETIC_VOCAB
    for span in (False, True):
        tokens, meta = synthetic_sample(rng, vocab, span=span)
        mask = query_token_loss_mask(tokens, meta)
        assert mask.sum() == sum(s[1] - s[0] for s in meta["segments"] if s[3] == -1)
        text = query_token_loss_mask(tokens, meta, kinds=("text",))
        assert (text <= mask).all() and 0 < text.sum() < mask.sum()
        specials = tokens < vocab.text_start  # sentinels, breaks, <eod>, <eoss> are never the query's tokens
        assert not mask[specials].any()
        if span:
            assert mask[-4:-1].all() and not mask[-1]  # the moved span, before its <eoss>


def test_query_token_loss_mask_matches_the_corpus_masker():
    """Against transforms.lib.layout (the pipeline's layout and masking): the mask picks exactly the query's ids."""
    from transforms.lib.layout import Doc, cm3_sequence

    vocab = Vocab(num_sentinels=4, text_size=100, image_codes=100, tokens_per_image=8)
    t, i = vocab.text_start, vocab.image_start
    neighbours = [Doc(list(range(t, t + 5)), list(range(i, i + 8))), Doc(list(range(t + 5, t + 9)), None)]
    query = Doc(list(range(t + 50, t + 56)), list(range(i + 50, i + 58)))
    spans_seen = 0
    for seed in range(30):
        masked = cm3_sequence(neighbours, query, vocab, seq_len=64, seed=seed, key=f"q{seed}")
        meta = {
            "segments": [[s.start, s.stop, s.kind, s.doc_index] for s in masked.layout.segments],
            "masked_spans": [[s.start, s.stop, s.segment] for s in masked.spans],
        }
        spans_seen += len(masked.spans)
        mask = query_token_loss_mask(masked.tokens, meta)
        assert sorted(masked.tokens[mask].tolist()) == sorted(query.text_ids + query.image_ids)
        image = query_token_loss_mask(masked.tokens, meta, kinds=("image",))
        assert sorted(masked.tokens[image].tolist()) == query.image_ids
    assert spans_seen > 10  # the check ran over moved spans, not only plain layouts


# ---------------------------------------------------------------------------------------------
# The loader.


def test_pad_gives_one_sample_per_row(tmp_path):
    paths = _write_tagged_shards(tmp_path, [[5, 9, 12]])
    batches = list(shard_loader(paths, 8, 2, shuffle_shards=False, pack=False, loop=False))
    assert [len(b["x"]) for b in batches] == [2, 1]  # one pass, the last batch short
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    assert x[0].tolist() == [EOD, 10, 20, 10, 20, PAD, PAD, PAD]
    assert y[0].tolist() == [10, 20, 10, 20, PAD, PAD, PAD, PAD]
    assert x[2].tolist() == [EOD, 10, 22, 10, 22, 10, 22, 10] and y[2, -1] == 22  # 12 tokens cut to a 9-token window
    assert (x[:, 0] == EOD).all()


def test_pack_concatenates_without_padding(tmp_path):
    lengths = [[5, 9, 12, 7], [6, 10]]
    paths = _write_tagged_shards(tmp_path, lengths)
    stream = np.concatenate([decode_tokens(_npy(t)) for t in _tagged_tokens(lengths)])
    batches = list(shard_loader(paths, 8, 2, shuffle_shards=False, pack=True, loop=False))
    x = torch.cat([b["x"] for b in batches]).numpy()
    y = torch.cat([b["y"] for b in batches]).numpy()
    assert (x != PAD).all()
    assert (x[:, 1:] == y[:, :-1]).all()
    # Rows continue one another: every token of the stream is a target exactly once.
    rebuilt = np.concatenate([x[0, :1], *y])
    assert (rebuilt == stream[: len(rebuilt)]).all() and len(stream) - len(rebuilt) < 9


def _tagged_tokens(lengths_per_shard):
    for s, lengths in enumerate(lengths_per_shard):
        for j, n in enumerate(lengths):
            yield np.array([EOD] + [10 + s, 20 + j] * ((n - 1) // 2) + [10 + s] * ((n - 1) % 2), np.int32)


def test_two_workers_read_disjoint_shards(tmp_path):
    paths = _write_tagged_shards(tmp_path, [[5] * 3 for _ in range(4)])
    loader = shard_loader(paths, 4, 1, shuffle_shards=False, pack=False, loop=False, num_workers=2)
    origins = [(int(b["x"][0, 1]) - 10, int(b["x"][0, 2]) - 20) for b in loader]
    by_worker = [{s for s, _ in origins[w::2]} for w in range(2)]  # the DataLoader alternates workers
    assert by_worker == [{0, 2}, {1, 3}]
    assert sorted(origins) == [(s, j) for s in range(4) for j in range(3)]  # every sample exactly once


def test_skip_batches_resumes_the_stream_exactly(corpus):
    pattern = str(corpus / "shards" / "cm3-*.tar")
    for workers in (0, 2):
        kwargs = {"shuffle_shards": True, "seed": 3, "pack": True, "num_workers": workers}
        full = [b["x"] for _, b in zip(range(30), shard_loader(pattern, 32, 4, **kwargs), strict=False)]
        resumed = [
            b["x"] for _, b in zip(range(7), shard_loader(pattern, 32, 4, skip_batches=23, **kwargs), strict=False)
        ]
        assert all(torch.equal(a, b) for a, b in zip(full[23:], resumed, strict=True))
    # Epochs visit the shards in seeded orders: reproducible, and changing from epoch to epoch.
    urls = expand_shards(pattern)
    orders = [_shard_order(urls, True, 3, epoch) for epoch in range(6)]
    assert orders == [_shard_order(urls, True, 3, epoch) for epoch in range(6)]
    assert all(sorted(o) == urls for o in orders) and len({tuple(o) for o in orders}) > 1
    assert _shard_order(urls, False, 3, 5) == urls


def test_query_mask_rides_along_with_the_batches(corpus):
    loader = shard_loader(str(corpus / "shards" / "cm3-000000.tar"), 64, 4, pack=False, loop=False, query_mask=True)
    batch = next(iter(loader))
    assert batch["loss_mask"].shape == batch["y"].shape and batch["loss_mask"].dtype == torch.bool
    assert (batch["y"][batch["loss_mask"]] >= SYNTHETIC_VOCAB.text_start).all()


# ---------------------------------------------------------------------------------------------
# The trainer.


def test_loss_falls_well_below_ln_vocab(tmp_path, corpus):
    summary = train(_config(tmp_path, corpus, "run", max_steps=40, eval_every=20, ckpt_every=0))
    start = math.log(SYNTHETIC_VOCAB.size)
    assert summary["losses"][0] == pytest.approx(start, abs=1e-4)  # zero output layer: uniform predictions
    assert np.mean(summary["losses"][-5:]) < 0.8 * start
    assert summary["eval_loss"] < 0.8 * start
    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS).read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41))
    assert {"loss", "lr", "tokens_per_s"} <= set(lines[0]) and "eval_loss" in lines[19] and "eval_loss" not in lines[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, corpus, workers):
    full = train(_config(tmp_path, corpus, "full", num_workers=workers))

    def crash_at_7(step: int, metrics: dict) -> None:
        if step == 7:  # two steps after the checkpoint at 5: those are redone, and logged once
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path, corpus, "crashed", num_workers=workers), on_step=crash_at_7)
    resumed = train(_config(tmp_path, corpus, "crashed", num_workers=workers, resume=True))
    assert resumed["losses"] == full["losses"][5:]
    a, b = load_checkpoint(str(tmp_path / "full" / CKPT)), load_checkpoint(str(tmp_path / "crashed" / CKPT))
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [json.loads(line) for line in (tmp_path / "crashed" / METRICS).read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, 11))
    assert [m["loss"] for m in steps] == full["losses"]


def test_checkpoint_loads_with_weights_only_and_carries_its_configs(tmp_path, corpus):
    train(_config(tmp_path, corpus, "run", max_steps=2, eval_every=0))
    ckpt = torch.load(tmp_path / "run" / CKPT, weights_only=True)
    assert ckpt["model_config"] == {
        "vocab_size": SYNTHETIC_VOCAB.size,
        "seq_len": 64,
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 64,
    }
    assert ckpt["train_config"]["max_steps"] == 2 and ckpt["data"] == {"batches": 2}
    assert set(ckpt["rng"]) >= {"torch", "python", "numpy"}


def test_cli_trains_and_writes_metrics(tmp_path, corpus, capsys):
    out = tmp_path / "cli"
    argv = ["--shards", str(corpus / "shards" / "cm3-*.tar"), "--output", str(out), "--max_steps", "3"]
    argv += ["--seq_len", "32", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--eval_every", "3"]
    argv += ["--no-pack", "--device", "cpu", "--log_every", "1", "--eval_query_loss"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 3/3" in printed and "tok/s" in printed and "eta" in printed
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    assert len(lines) == 3 and "eval_loss" in lines[-1]
    assert 0 < lines[-1]["eval_query_loss"] != lines[-1]["eval_loss"]
    assert load_checkpoint(str(out / CKPT))["train_config"]["pack"] is False


def test_warmup_longer_than_the_run_is_scaled_with_a_warning():
    from model.train import TrainConfig, lr_at, scaled_warmup

    cfg = TrainConfig(shards="x", output="y", max_steps=60, warmup_steps=100)
    # Unscaled, a 60-step run never reaches the peak learning rate.
    assert max(lr_at(s, cfg) for s in range(60)) < cfg.lr
    fixed, note = scaled_warmup(cfg)
    assert fixed.warmup_steps == 6 and "--warmup_steps 100" in note
    assert max(lr_at(s, fixed) for s in range(60)) == pytest.approx(cfg.lr)
    same, none = scaled_warmup(TrainConfig(shards="x", output="y", max_steps=1000, warmup_steps=100))
    assert same.warmup_steps == 100 and none is None


@pytest.mark.parametrize("flag", ["--max_steps", "--batch_size"])
def test_train_refuses_non_positive_sizes_in_one_line(flag, capsys):
    from model.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--shards", "x", "--output", "y", flag, "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "Traceback" not in err
