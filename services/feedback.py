"""`POST /v1/feedback`: the chat page's ratings and better answers, kept for `dolly feedback` to
review (contract/feedback.py). Once per Idempotency-Key, so that a retry of a request whose answer
was lost stores nothing twice; a correction the preparation pipeline would reject is refused now,
for the same reason."""

from __future__ import annotations

import asyncio

from contract.feedback import FeedbackStore, KeyReused
from contract.records import RecordError
from services.errors import ApiError
from services.metrics import IngressMetrics
from services.protocol import FeedbackRequest, FeedbackSaved
from services.routing import ServedModels


class FeedbackDesk:
    def __init__(self, database_url: str, served: ServedModels, metrics: IngressMetrics):
        self._store, self._served, self._metrics = FeedbackStore(database_url), served, metrics

    async def save(self, body: FeedbackRequest, request_key: str | None = None) -> FeedbackSaved:
        self._served.check_answered_here(body.model)
        correction = body.correction
        item = dict(
            model=body.model,
            answer_id=body.answer_id,
            instruction=body.instruction,
            context=body.context,
            answer=body.answer,
            rating=body.rating,
            response=correction and correction.response,
            category=correction and correction.category,
            user=body.user,
        )
        try:
            if request_key is None:
                saved, first = await asyncio.to_thread(self._store.add, **item), True
            else:
                saved, first = await asyncio.to_thread(self._store.add_once, request_key, **item)
        except RecordError as e:  # what the preparation pipeline would reject: the same reason
            field = {"response": "correction.response", "category": "correction.category"}.get(e.field, e.field)
            raise ApiError(422, f"{e.detail} ({e.reason.value}): this record could not train a model", field) from None
        except KeyReused as e:  # as the IETF's Idempotency-Key draft answers a key reused for another body
            raise ApiError(422, str(e), "Idempotency-Key") from None
        if first:
            self._metrics.rated(body.rating, correction is not None, body.model)
        return FeedbackSaved(id=saved, status="saved for review" if correction else "rating saved")
