"""Small test helpers shared by several test modules."""

from __future__ import annotations

import asyncio
import threading

import grpc


class LoopThread:
    """An event loop in a thread: the server runs here while tests block in their own loops."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


class SpyTalker:
    """Records the token ids the Talker receives."""

    def __init__(self, inner):
        self.inner, self.received = inner, []

    async def speak(self, prompt, sampling, max_frames, text):
        async def spy():
            async for t in text:
                self.received.append(t)
                yield t

        async for codes in self.inner.speak(prompt, sampling, max_frames, spy()):
            yield codes


def a_word(text: str) -> str:
    """A word of an answer to filter in a second run: the first one of 4+ letters."""
    words = [w for w in text.split() if len(w) >= 4 and w.isalpha()]
    assert words, text
    return words[0]


def assert_rejected_for_size(error: grpc.RpcError) -> None:
    """A message over gRPC's size limit ends the call with RESOURCE_EXHAUSTED. When the client is still pushing
    that message as the rejection arrives, grpc.aio reports the failed send instead of the status it received:
    INTERNAL "Internal error from Core" naming the SendMessageOperation (grpc/grpc#36066). Both mean the
    limit fired; any other status, or no error at all, does not."""
    if error.code() == grpc.StatusCode.INTERNAL:
        assert error.details() == "Internal error from Core", error
        assert "SendMessageOperation" in (error.debug_error_string() or ""), error
    else:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
