"""Domain errors. Servicers map them to gRPC status codes; the CLI prints them as one line."""


class OmniError(Exception):
    """Base of every error this project raises on purpose."""


class CheckpointError(OmniError):
    """The checkpoint directory is missing files or holds another model."""


class InvalidInput(OmniError):
    """A request's input is malformed: bad audio, corrupt image, unknown speaker, codes out of range."""


class ResourceExhausted(OmniError):
    """A request asks for more than a configured limit (input size, sequence length)."""


class DeadlineExceeded(OmniError):
    """A stage waited longer than its deadline for its input."""


class Unauthenticated(OmniError):
    """A client call without valid credentials (gRPC: UNAUTHENTICATED)."""


class PrefixGone(OmniError):
    """A request builds on state its replica no longer holds (evicted, or another replica took the request): the
    caller sends the request whole instead (gRPC: ABORTED)."""
