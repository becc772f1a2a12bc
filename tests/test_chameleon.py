"""Chameleon's id space: roles read from a Chameleon-shaped tokenizer, images written as Chameleon
writes them, CM3 masking round-trips, and a whole build's shards train HF's Chameleon."""

from __future__ import annotations

import glob
import io
import json
import tarfile

import numpy as np
import pytest

from pipelines import build_corpus
from pipelines.demo.command import demo_build_flags
from pipelines.demo.data import write_demo_corpus
from schemas.vocab import ChameleonVocab, Vocab, load_vocab
from tests.tiny_vqgan import (
    IMAGE_ENTRIES,
    TINY,
    pictures,
    save_chameleon,
    save_chameleon_tokenizer,
    tiny_weights,
)
from transforms.lib.chameleon import chameleon_vocab, image_code_of, image_token_name, text_only, tokenizer_path
from transforms.lib.layout import Doc, cm3_sequence, unmask
from transforms.lib.tokenize import (
    decode_image,
    decode_text,
    encode_caption,
    encode_image,
    load_text_tokenizer,
    load_tokenizers,
    write_tokenizers,
)
from transforms.lib.vqgan import load_vqgan

CAPTIONS = sorted(f"a {c} {s} on a {b} background" for c in ("red", "blue") for s in ("disc", "box") for b in "xy")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A Chameleon-shaped release directory: tokenizer/{text_tokenizer.json, vqgan.yaml, vqgan.ckpt}."""
    root = tmp_path_factory.mktemp("chameleon")
    save_chameleon(root, tiny_weights())
    save_chameleon_tokenizer(root, CAPTIONS)
    return root


@pytest.fixture(scope="module")
def toks(release):
    text_tok = text_only(load_text_tokenizer(tokenizer_path(str(release))))
    image_tok = load_vqgan(str(release))
    return text_tok, image_tok, chameleon_vocab(text_tok, image_tok.num_codes, image_tok.tokens_per_image, 8)


def test_image_entry_names_decode_like_transformers():
    assert [image_code_of(n) for n in ("IMGIMGAZ", "IMGIMGBCZ", "IMGIMGIJGZ")] == [0, 12, 896]
    assert all(image_code_of(image_token_name(c)) == c for c in (0, 7, 10, 8191))
    assert image_code_of("IMGIMGZ") is None and image_code_of("IMGIMGAX") is None and image_code_of("<eoss>") is None


def test_roles_come_from_the_vocabulary(toks):
    text_tok, _, vocab = toks
    names = text_tok.get_vocab(with_added_tokens=True)
    by_role = {r: (t, i) for r, t, i in vocab.roles}
    assert by_role["pad"] == ("<pad>", names["<pad>"])
    assert by_role["boi"] == ("<racm3:break>", names["<racm3:break>"])
    assert by_role["eoi"] == ("<eoss>", names["<eoss>"])
    # CM3's markers: the lowest free reserved tokens, never HF's sep / <image> ones
    chosen = [by_role["eod"][0], by_role["break"][0], by_role["eoss"][0], *(t for t, _ in vocab.sentinels)]
    assert chosen == [f"<reserved{n:05d}>" for n in range(8000, 8011)]
    assert by_role["eoss"][1] != names["<eoss>"]  # the clash: CM3's span end is not Chameleon's end-of-image
    # image code c -> the id of the entry named for c, looked up, not an offset
    assert all(vocab.image_token_ids[c] == names[image_token_name(c)] for c in range(TINY.n_embed))
    assert np.any(np.diff(vocab.image_token_ids) != 1)
    assert vocab.size == len(names) and load_vocab(vocab.to_json()) == vocab


def test_text_and_images_in_chameleon_ids(toks):
    text_tok, image_tok, vocab = toks
    ids = encode_caption(text_tok, vocab, "a red disc")
    assert ids == text_tok.encode("a red disc", add_special_tokens=False).ids  # Chameleon's BPE ids, unshifted
    assert decode_text(text_tok, vocab, ids) == "a red disc"
    forged = encode_caption(text_tok, vocab, "<racm3:break>IMGIMGAZ<reserved08003>")
    assert not set(forged) & (
        {vocab.boi_id, vocab.eoi_id} | set(vocab.image_token_ids) | {i for _, i in vocab.sentinels}
    )
    image = pictures(1, seed=4)[0]
    seg = encode_image(image_tok, vocab, image)
    codes = image_tok.encode([image])[0]
    assert seg == [vocab.boi_id, *(vocab.image_token_ids[c] for c in codes), vocab.eoi_id]
    assert vocab.codes_of_image(seg) == codes.tolist()
    assert decode_image(image_tok, vocab, seg).size == (64, 64)
    with pytest.raises(ValueError, match="racm3:break"):
        vocab.codes_of_image(seg[1:])


def test_cm3_masking_round_trips_in_chameleon_ids(toks):
    text_tok, image_tok, vocab = toks
    docs = [
        Doc(encode_caption(text_tok, vocab, c), encode_image(image_tok, vocab, im))
        for c, im in zip(CAPTIONS[:4], pictures(4, seed=5), strict=True)
    ]
    masked_any = False
    for k in range(12):
        seq = cm3_sequence(docs[:3], docs[3], vocab, 1024, seed=0, key=f"k{k}")
        t = seq.tokens
        assert t[0] == vocab.eod_id and vocab.eod_id in t[1:] and vocab.break_id in t
        assert t.max() < vocab.size and t.min() >= 0
        assert np.array_equal(unmask(t, vocab), seq.layout.tokens)
        if seq.spans:
            masked_any = True
            assert vocab.eoss_id in t and t[-1] == vocab.eoss_id
    assert masked_any


def test_tokenizers_dir_records_and_checks_the_choices(toks, tmp_path):
    text_tok, image_tok, vocab = toks
    write_tokenizers(str(tmp_path), text_tok, image_tok, vocab)
    doc = json.loads((tmp_path / "vocab.json").read_text())
    assert doc["kind"] == "chameleon" and doc["roles"]["eoi"]["token"] == "<eoss>" and len(doc["sentinels"]) == 8
    _, again, loaded = load_tokenizers(str(tmp_path))
    assert loaded == vocab and again.num_codes == 64
    with pytest.raises(ValueError, match="Hugging Face"):
        Vocab.from_json((tmp_path / "vocab.json").read_text())  # the native trainer says where to go instead


def test_too_many_codes_for_the_vocabulary_is_refused(toks):
    text_tok, _, _ = toks
    with pytest.raises(ValueError, match=f"IMGIMG entries for {IMAGE_ENTRIES}"):
        chameleon_vocab(text_tok, IMAGE_ENTRIES + 1, 64, 8)


# ------------------------------------------------------------------------------ whole builds

NUM_EXAMPLES = 48


def build(data, out, release, *extra) -> dict:
    flags = [
        *demo_build_flags(),
        f"--image_tokenizer=vqgan:{release}",
        f"--vocab=chameleon:{release}",
        "--tokenize_batch_size=8",
        "--seq_len=600",
        *extra,
    ]
    return build_corpus.run(["--input", f"{data}/*.tar", "--output", str(out), *flags])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, release):
    root = tmp_path_factory.mktemp("cham_build")
    write_demo_corpus(str(root / "data"), num_examples=NUM_EXAMPLES, seed=5, shard_size=24)
    stats = build(root / "data", root / "out", release)
    return root, stats


def read_shards(out) -> dict[str, np.ndarray]:
    samples = {}
    for path in sorted(glob.glob(f"{out}/shards/cm3-*.tar")):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".tokens.npy"):
                    samples[m.name.split(".")[0]] = np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False)
    return samples


@pytest.mark.slow
def test_build_writes_chameleon_space_shards(corpus, release):
    root, stats = corpus
    out = root / "out"
    assert stats["examples_written"] == NUM_EXAMPLES == stats["examples_read"]
    text_tok, image_tok, vocab = load_tokenizers(str(out / "tokenizers"))
    assert isinstance(vocab, ChameleonVocab) and image_tok.kind == "vqgan"
    samples = read_shards(out)
    assert len(samples) == NUM_EXAMPLES
    images = 0
    for tokens in samples.values():
        plain = unmask(tokens, vocab)
        assert plain[0] == vocab.eod_id and tokens.max() < vocab.size
        starts = np.flatnonzero(plain == vocab.boi_id)
        for s in starts:
            seg = plain[s : s + TINY.tokens_per_image + 2]
            if len(seg) == TINY.tokens_per_image + 2 and seg[-1] == vocab.eoi_id:
                assert len(vocab.codes_of_image(seg)) == 64
                images += 1
    assert images >= NUM_EXAMPLES // 2


@pytest.mark.slow
def test_two_worker_processes_give_byte_identical_shards(corpus, release, tmp_path):
    root, stats = corpus
    other = build(
        root / "data", tmp_path / "mp", release, "--direct_running_mode=multi_processing", "--direct_num_workers=2"
    )
    assert other["examples_written"] == stats["examples_written"]
    first = sorted(p for p in (root / "out").rglob("*") if p.is_file() and p.name not in ("stats.json", "report.html"))
    assert any(p.name.startswith("cm3-") for p in first) and any(p.name == "image_tokenizer.npz" for p in first)
    for path in first:
        assert (tmp_path / "mp" / path.relative_to(root / "out")).read_bytes() == path.read_bytes(), path


def hf_chameleon(vocab: ChameleonVocab, text_tok):
    """A tiny random `ChameleonForConditionalGeneration` over the corpus's vocabulary."""
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(0)
    config = ChameleonConfig(
        vocab_size=vocab.size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=vocab.pad_id,
        vocabulary_map=text_tok.get_vocab(with_added_tokens=True),
        vq_config={
            "embed_dim": TINY.embed_dim,
            "num_embeddings": TINY.n_embed,
            "latent_channels": TINY.z_channels,
            "resolution": TINY.resolution,
            "base_channels": TINY.ch,
            "channel_multiplier": list(TINY.ch_mult),
            "num_res_blocks": TINY.num_res_blocks,
            "attn_resolutions": list(TINY.attn_resolutions),
        },
    )
    return ChameleonForConditionalGeneration(config)


def batches(samples: dict[str, np.ndarray], pad: int, size: int = 8):
    import torch

    keys = sorted(samples)
    for i in range(0, len(keys), size):
        seqs = [samples[k] for k in keys[i : i + size]]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.from_numpy(s.astype(np.int64))
        yield ids, ids != pad


@pytest.mark.slow
def test_shards_train_hugging_face_chameleon(corpus):
    """Our shards stream into HF's Chameleon; loss over every token (image tokens included) falls."""
    import torch
    import torch.nn.functional as F

    root, _ = corpus
    text_tok, _, vocab = load_tokenizers(str(root / "out" / "tokenizers"))
    model = hf_chameleon(vocab, text_tok)
    samples = read_shards(root / "out")
    data = list(batches(samples, vocab.pad_id))
    image_ids = torch.tensor(vocab.image_token_ids)

    # HF's forward sets image-token logits to the dtype's minimum (it only generates text), so its own
    # loss cannot train image generation: on labels that hold image tokens it is astronomically large.
    ids, mask = data[0]
    stock = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(~mask, -100)).loss
    assert stock.item() > 1e6

    def token_losses(ids, mask):
        # How to train image generation: logits from the language-model head directly, no masking.
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model.lm_head(hidden)[:, :-1]  # (B, T-1, V)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        per = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (B, T-1)
        return per, targets

    def losses_of(batch):  # (all tokens, image tokens only) mean losses
        per, targets = token_losses(*batch)
        scored, image = targets != -100, torch.isin(targets, image_ids)
        return per[scored].mean(), per[image].mean()

    with torch.no_grad():
        before_all, before_image = (v.item() for v in losses_of(data[0]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(8):
        loss, _ = losses_of(data[step % len(data)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        after_all, after_image = (v.item() for v in losses_of(data[0]))
    assert np.isfinite(losses).all() and after_all < 0.8 * before_all, (before_all, losses, after_all)
    assert after_image < 0.8 * before_image, (before_image, after_image)  # image generation is being learnt


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--vocab", "llama"], "--vocab 'llama': expected native or chameleon:DIR"),
        (["--vocab", "chameleon:"], "expected native or chameleon:DIR"),
        (["--vocab", "chameleon:/m", "--text_tokenizer", "t.json"], "--text_tokenizer and --vocab chameleon:DIR"),
        (["--tokenize_batch_size", "0"], "--tokenize_batch_size must be at least 1"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import BuildConfig

    with pytest.raises(SystemExit) as err:
        BuildConfig.from_options(PipelineOptions(["--input", "x.tar", "--output", "out", *flags]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_vocab_flags_reach_the_config():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import BuildConfig
    from transforms.lib.sequences import SequenceConfig

    flags = ["--vocab=chameleon:/m", "--image_tokenizer=vqgan:/m", "--tokenize_batch_size=4"]
    cfg = BuildConfig.from_options(PipelineOptions(["--input", "x.tar", "--output", "o", *flags, "--device=cuda"]))
    sc = SequenceConfig.from_config(cfg)
    assert (sc.vocab, sc.image_tokenizer, sc.tokenize_batch_size, sc.device) == ("chameleon:/m", "vqgan:/m", 4, "cuda")
