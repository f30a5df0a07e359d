"""Admission control: who may start a request now (draining, duplicate ids, queue limit)."""

from __future__ import annotations

import math

from pdserve.server.errors import APIError

RETRY_AFTER_S = 1


class Admission:
    """Tracks the engine request ids in flight. A request is *queued* when it would not fit in the
    running batch (`max_num_seqs`); more than `max_queued` queued requests answer 429.

    An id stays reserved until the engine has delivered the request's final output, so a client
    that reuses an X-Request-Id right after an abort cannot collide with the aborted request.
    """

    def __init__(self, max_num_seqs: int, max_queued: int | None) -> None:
        self.capacity = math.inf if max_queued is None else max_num_seqs + max_queued
        self.in_flight: set[str] = set()
        self.draining = False

    @property
    def num_in_flight(self) -> int:
        return len(self.in_flight)

    def check_open(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")

    def admit(self, request_id: str) -> None:
        """Reserve `request_id`, or raise the APIError that says why not."""
        self.check_open()
        if request_id in self.in_flight:
            raise APIError(
                409,
                f"request id {request_id!r} is already in flight",
                code="duplicate_request_id",
                param="X-Request-Id",
            )
        if len(self.in_flight) >= self.capacity:
            raise APIError(
                429,
                "too many requests are queued; retry later",
                code="too_many_requests",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.in_flight.add(request_id)

    def release(self, request_id: str) -> None:
        self.in_flight.discard(request_id)
