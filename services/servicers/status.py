"""Domain errors <-> gRPC status codes, both ways: servicers turn errors into statuses, stage clients turn statuses
back into the same errors, so a conductor behind gRPC sees what it would see in process and can map them again.

    InvalidInput <-> INVALID_ARGUMENT      ResourceExhausted <-> RESOURCE_EXHAUSTED
    DeadlineExceeded <-> DEADLINE_EXCEEDED  CheckpointError <-> FAILED_PRECONDITION
    Unauthenticated <-> UNAUTHENTICATED     PrefixGone <-> ABORTED
    anything else -> INTERNAL (traceback logged); other statuses come back as StageError with their code

Details that reach a client never carry internal addresses: grpc's own UNAVAILABLE text ("failed to connect to all
addresses; last error: ... ipv4:10.0.0.5:12345 ...") is logged here and replaced by which stage could not be
reached, and any address left in a message is masked (`public_details`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from services.errors import (
    CheckpointError,
    DeadlineExceeded,
    InvalidInput,
    OmniError,
    PrefixGone,
    ResourceExhausted,
    Unauthenticated,
)

log = logging.getLogger(__name__)

_CODES: dict[type[OmniError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    CheckpointError: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PrefixGone: grpc.StatusCode.ABORTED,
}
_ERRORS = {code: cls for cls, code in _CODES.items()}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_MAX_DETAILS = 500  # keep an unexpected exception's message short; the traceback goes to the log
# A socket address as grpc and Ray write them: ipv4:/ipv6:/unix: URIs, IPv4 or bracketed IPv6 with an optional port.
_ADDRESS = re.compile(r"\b(?:ipv4|ipv6|unix|unix-abstract|vsock):[^\s,;'\"()]+"
                      r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F.]*:[0-9a-fA-F:.]*\](?::\d+)?")


class StageError(OmniError):
    """A stage call ended with a status that has no domain error (UNAVAILABLE, INTERNAL, CANCELLED...)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a servicer answers for `error`."""
    if isinstance(error, StageError):  # a stage behind this one failed: pass its code on (UNAVAILABLE stays so)
        return error.code, public_details(str(error))
    for cls, code in _CODES.items():
        if isinstance(error, cls):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"[:_MAX_DETAILS]


def error_of(error: grpc.aio.AioRpcError, stage: str) -> OmniError:
    """The domain error for a failed call to `stage`."""
    return error_from(error.code(), error.details() or "", stage)


def error_from(code: grpc.StatusCode, details: str, stage: str) -> OmniError:
    """The domain error for a status `stage` answered (as a call's status, or in band)."""
    cls = _ERRORS.get(code)
    if cls is not None:
        return cls(public_details(details))
    log.warning("%s stage: %s: %s", stage, code.name, details)
    public = public_details(details)
    if code == grpc.StatusCode.UNAVAILABLE and public != details:  # grpc's connection failure, naming addresses
        public = "no replica could be reached (connection failed; the gateway's log has the details)"
    return StageError(code, f"{stage} stage: {code.name}: {public}")


def status_code(number: int) -> grpc.StatusCode:
    """The grpc status code numbered `number` (as a message carries it in band); UNKNOWN for a number it lacks."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def public_details(details: str) -> str:
    """`details` with every socket address masked: fit for a client."""
    return _ADDRESS.sub("<internal address>", details)


@asynccontextmanager
async def translate_errors(context: grpc.aio.ServicerContext, stage: str) -> AsyncIterator[None]:
    """Around a servicer method: end the call with the status of any error raised inside. Cancellation passes
    through untouched (the caller is gone), so does an abort already in progress."""
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as e:
        await context.abort(*reported(e, stage))


def reported(error: Exception, stage: str) -> tuple[grpc.StatusCode, str]:
    """`status_of(error)`, with the traceback logged where it is a bug (INTERNAL). Call it in the `except` block."""
    code, details = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s stage: unexpected error", stage)
    return code, details
