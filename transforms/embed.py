"""Frozen CLIP embeddings through Beam's RunInference (docs/design.md: "embed with frozen CLIP").

`EmbedExamples` turns each `Example` into an `EmbeddedExample`: `image_emb` when it has an image,
`text_emb` when it has a caption, `query_text_emb` (the caption after RA-CM3 query dropout, the
retrieval's text query) and `doc_emb = normalize(mean(image_emb, text_emb))`, or the one part there
is. All are float32 and unit norm. The model is loaded once per worker process by
`ClipModelHandler.load_model()`; Beam's RunInference batches the examples.

The CLIP's loading is `transforms/lib/clip.py`, the embedding passes `transforms/lib/embed.py`; here are
the RunInference handler, the key-chosen batches and the split of results from failures.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from schemas.records import EmbeddedExample, Example, Reject
from transforms.common import KeyedBatches
from transforms.lib.clip import resolve_clip
from transforms.lib.embed import ClipEmbedder, embedded_example
from transforms.lib.validate import describe_error, strip_addresses
from transforms.rejects import REJECTED, stage_error

NAMESPACE = "embed"

# Model loads in this process, by --clip_model; tests read it (Beam's counter is the run's total).
MODEL_LOADS: Counter = Counter()
_loads_lock = threading.Lock()


class ClipModelHandler(ModelHandler[Example, Any, ClipEmbedder]):
    """RunInference handler: Example → EmbeddedExample (or an error string for that example).

    Keeps only picklable names; the model is built in `load_model()` on the worker.

    Args:
        clip_model: see `resolve_clip`.
        clip_pretrained: see `resolve_clip`.
        device: "cpu" or "cuda".
        batch_size: the largest batch RunInference hands to the model.
        seed: the run's seed (query dropout).
        query_dropout: share of caption tokens dropped from the text query.
        share_across_processes: keep one model per machine instead of one per process (large models on
            one GPU); Beam falls back to per-process where the runner cannot share.
    """

    def __init__(
        self,
        clip_model: str,
        clip_pretrained: str | None,
        device: str = "cpu",
        batch_size: int = 64,
        seed: int = 0,
        query_dropout: float = 0.2,
        share_across_processes: bool = False,
    ):
        super().__init__()
        self._clip_model, self._clip_pretrained, self._device = clip_model, clip_pretrained, device
        self.batch_size, self._seed, self._query_dropout = batch_size, seed, query_dropout
        self._share = share_across_processes

    def load_model(self) -> ClipEmbedder:
        model, preprocess, tokenizer = resolve_clip(self._clip_model, self._clip_pretrained, self._device)
        with _loads_lock:
            MODEL_LOADS[self._clip_model] += 1
        return ClipEmbedder(model, preprocess, tokenizer, self._device)

    def run_inference(
        self, batch: Sequence[Sequence[Example]], model: ClipEmbedder, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        """Each element is one model batch made by `KeyedBatches`; its result lists one entry per example."""
        # Counted on first use, inside a bundle: a counter touched in setup() may never be committed.
        Metrics.counter(NAMESPACE, "clip_model_loads").inc(model.take_load_report())
        return [PredictionResult(group, self.embed_batch(group, model)) for group in batch]

    def embed_batch(self, examples: Sequence[Example], model: ClipEmbedder) -> list[EmbeddedExample | str]:
        """Embed one model batch: per example an EmbeddedExample, or an error string."""
        out = model.embed([(e.key, e.image, e.caption) for e in examples], self._seed, self._query_dropout)
        return [r if isinstance(r, str) else embedded_example(e, *r) for e, r in zip(examples, out, strict=True)]

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Batches are made upstream from the keys (KeyedBatches): a float result must not depend on
        # which other examples a runner's bundle put beside it, or reruns would differ in the bits.
        return {"min_batch_size": 1, "max_batch_size": 1}

    def share_model_across_processes(self) -> bool:
        return self._share

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def get_num_bytes(self, batch: Sequence[Sequence[Example]]) -> int:
        # cheaper than pickling the batch
        return sum(len(e.image or b"") + len(e.caption or "") for group in batch for e in group)


class _SplitResults(beam.DoFn):
    def process(self, result: PredictionResult):
        for example, inference in zip(result.example, result.inference, strict=True):
            if isinstance(inference, str):
                yield stage_error(example.key, example.source, "embed", inference)
            else:
                Metrics.counter(NAMESPACE, "examples_embedded").inc()
                yield inference


def _batch_rejects(failed) -> list[Reject]:
    """A RunInference dead letter → one Reject per example of the failed batch.

    Beam 2.78's dead letter is `(batch, (exception class, repr, traceback lines))`; earlier releases
    gave the exception itself. Untyped on purpose: a hint for one form fails pipeline construction on the other.
    """
    groups, error = failed
    batch = [e for group in groups for e in group]
    Metrics.counter(REJECTED, "stage_error").inc(len(batch))
    detail = f"embed batch failed: {_describe_dead_letter(error)}"
    return [Reject(e.key, e.source, "stage_error", detail) for e in batch]


def _describe_dead_letter(error) -> str:
    """`describe_error`'s `Type: message` for an exception or Beam's (class, repr, traceback lines)."""
    if isinstance(error, BaseException):
        return describe_error(error)
    cls, rep, lines = error
    last = lines[-1].strip() if lines else rep  # traceback.format_exception's last entry: "pkg.Type: message"
    message = last.split(": ", 1)[1] if ": " in last else ""
    return strip_addresses(f"{cls.__name__}: {message}")


class EmbedExamples(beam.PTransform):
    """PCollection[Example] → (PCollection[EmbeddedExample], PCollection[Reject]).

    An example whose embedding fails (an image that will not decode, a batch that raises) becomes a
    `Reject(key, source, "stage_error", detail)` instead of failing the pipeline.

    Args: as `ClipModelHandler` (clip_model, clip_pretrained, then its keyword options); `from_config`
    takes them from a BuildConfig.
    """

    def __init__(self, clip_model: str, clip_pretrained: str | None, **options: Any):
        super().__init__()
        # One model per GPU machine rather than per process: big towers, one device.
        options.setdefault("share_across_processes", str(options.get("device", "cpu")).startswith("cuda"))
        self._handler = ClipModelHandler(clip_model, clip_pretrained, **options)
        self._batch_size = self._handler.batch_size

    @classmethod
    def from_config(cls, cfg) -> EmbedExamples:
        """Build from a BuildConfig's clip_model, clip_pretrained, device, embed_batch_size, seed, query_dropout."""
        return cls(
            cfg.clip_model,
            cfg.clip_pretrained,
            device=cfg.device,
            batch_size=cfg.embed_batch_size,
            seed=cfg.seed,
            query_dropout=cfg.query_dropout,
        )

    def expand(self, examples):
        batches = examples | "KeyedBatches" >> KeyedBatches(self._batch_size)
        results, dlq = batches | "RunInference" >> RunInference(self._handler).with_exception_handling()
        split = results | "Split" >> beam.ParDo(_SplitResults()).with_outputs(REJECTED, main="embedded")
        batch_failed = dlq.failed_inferences | "BatchFailures" >> beam.FlatMap(_batch_rejects)
        return split.embedded, (split[REJECTED], batch_failed) | "AllFailed" >> beam.Flatten()
