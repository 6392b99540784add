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


def reference_inputs(processor, messages: list[dict]) -> dict:
    """What a user of the reference passes to `generate` for a conversation, built without our preprocessing: the
    chat template over the messages exactly as given, and the processor over their media in the order they stand
    in the prompt. Media: 16 kHz WAV paths, bytes or arrays (or `AudioInput`); image paths, bytes or PIL images;
    videos as {"frames": [PIL], "timestamps", "audio": 16 kHz array, ...}. Videos with sound tracks follow the
    processor's own `load_audio_from_video` route (one audio slot per track, in prompt order)."""
    import io

    import numpy as np
    import PIL.Image
    import soundfile as sf
    import torch

    def audio(value) -> np.ndarray:
        if hasattr(value, "samples"):  # services.preprocess.AudioInput
            return value.samples
        if isinstance(value, np.ndarray):
            return value.astype(np.float32)
        samples, rate = sf.read(io.BytesIO(value) if isinstance(value, bytes) else value, dtype="float32")
        assert rate == 16000 and samples.ndim == 1, "reference_inputs takes 16 kHz mono audio"
        return samples

    def image(value) -> PIL.Image.Image:
        return value if isinstance(value, PIL.Image.Image) else PIL.Image.open(
            io.BytesIO(value) if isinstance(value, bytes) else value).convert("RGB")

    audios, slots, images, videos, fps = [], [], [], [], None
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else ():
            if part["type"] == "audio":
                audios.append(audio(part["audio"]))
                slots.append(None)
            elif part["type"] == "image":
                images.append(image(part["image"]))
            elif part["type"] == "video":
                video = part["video"]
                if video.get("audio") is not None:
                    audios.append(audio(video["audio"]))
                    slots.append(len(videos))
                times = video["timestamps"]
                fps = (len(times) - 1) / (times[-1] - times[0])
                videos.append([image(f) for f in video["frames"]])
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {}
    if videos:
        kwargs["videos_kwargs"] = {"do_sample_frames": False, "cap_pixels_per_frame": True, "fps": fps}
    with_track = any(s is not None for s in slots)
    if with_track:
        kwargs.update(load_audio_from_video=True, audio_from_video_indices=slots)
    out = dict(processor(text=prompt, audio=audios or None, images=images or None, videos=videos or None,
                         return_tensors="pt", **kwargs))
    if "video_second_per_grid" in out:
        out["video_second_per_grid"] = torch.as_tensor(out["video_second_per_grid"])
    if with_track:
        out["use_audio_in_video"] = True
    return out
