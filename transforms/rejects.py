"""The rejects stage: one row per rejected example, written as `rejects/`.

Every stage turns an example it cannot use into a `Reject(key, source, reason, detail)` with `reject`
or `stage_error` (counted under its reason, tagged REJECTED for the stage's reject output); the build
flattens them, folds one example's stage errors into one (`OneRejectPerExample`) and writes them
with `reject_rows`, sorted by `reject_sort_key`.
"""

from __future__ import annotations

from collections.abc import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.records import Reject
from transforms.lib.validate import describe_error, printable

REJECTED = "rejected"  # the tag of every stage's reject output, and the namespace its counters default to


def reject(r: Reject, namespace: str = REJECTED) -> beam.pvalue.TaggedOutput:
    """Count `r` under (`namespace`, its reason) and tag it for the stage's reject output.

    `namespace` is "rejected", or "<prefix>rejected" for inputs counted apart (`--neighbour_input`).
    """
    Metrics.counter(namespace, r.reason).inc()
    return beam.pvalue.TaggedOutput(REJECTED, r)


def stage_error(key: str, source: str, what: str, error: Exception | str, namespace: str = REJECTED):
    """`reject` of a `stage_error`: the stage (`what`) and the error's `Type: message` as its detail."""
    detail = error if isinstance(error, str) else describe_error(error)
    return reject(Reject(key, source, "stage_error", f"{what}: {detail}"), namespace)


def reject_rows(r: Reject) -> list[dict]:
    # printable: a name that was not UTF-8 (a tar member, a file) must not stop the rejects writer
    return [{"key": printable(r.key), "source": printable(r.source), "reason": r.reason, "detail": printable(r.detail)}]


def reject_sort_key(r: Reject) -> str:
    return f"{r.source}\x00{r.key}\x00{r.reason}\x00{r.detail}"


class OneRejectPerExample(beam.PTransform):
    """Fold the `stage_error` rejects of one example (same key and source) into one.

    Embedding and tokenizing both see every example, so one example can fail in both; counted twice
    it would break read == written + rejected. Other reasons come from ingest, once per sample.
    """

    def expand(self, rejects):
        other, stage = rejects | "ByReason" >> beam.Partition(lambda r, _: int(r.reason == "stage_error"), 2)
        folded = (
            stage
            | "ByExample" >> beam.Map(lambda r: ((r.key, r.source), r))
            | "Group" >> beam.GroupByKey()
            | "Fold" >> beam.Map(_fold_rejects)
        )
        return (other, folded) | "Merge" >> beam.Flatten()


def _fold_rejects(keyed: tuple[tuple[str, str], Iterable[Reject]]) -> Reject:
    (key, source), rejects = keyed
    rejects = list(rejects)
    details = sorted({r.detail for r in rejects})
    if len(rejects) > 1:  # each was counted where it was made
        Metrics.counter(REJECTED, "stage_error").dec(len(rejects) - 1)
    return Reject(key, source, "stage_error", "; ".join(details))
