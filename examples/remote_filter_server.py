"""An example of user code served over gRPC to the hook stage (`protos/omni/v1/text_filter.proto`).

- `TextFilter`: masks the words of a list ("darn" -> "d***"), case-insensitively. A word may arrive in pieces
  ("da" + "rn"), so the filter keeps the last, maybe unfinished word for the next piece (`keep`).
- `Tool`: `convert_temperature`, degrees Celsius to Fahrenheit.

Run it, then name it in the deployment config:

    python examples/remote_filter_server.py --port 50070 --words darn heck

    hooks:
      filters: [{use: remote, options: {target: "localhost:50070", deadline_s: 0.2, on_failure: fail_open}}]
      tools:
        - name: convert_temperature
          target: "localhost:50070"
          description: Convert a temperature from degrees Celsius to Fahrenheit.
          parameters: {type: object, properties: {celsius: {type: number}}, required: [celsius]}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re

import grpc

from services.wire.gen.omni.v1 import text_filter_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import HookEvent
from services.wire.gen.omni.v1.text_filter_pb2 import TextRelease, TextVerdict, ToolResult

DEFAULT_WORDS = ("darn", "heck")


class MaskWords(text_filter_pb2_grpc.TextFilterServicer):
    def __init__(self, words=DEFAULT_WORDS):
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)

    async def Filter(self, request_iterator, context):
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind == "start":
                continue
            text = request.text.text if kind == "text" else request.end.text
            # Decide on complete words only: keep the tail after the last space unless the answer has ended.
            cut = len(text) if kind == "end" else text.rfind(" ") + 1
            masked, n = self.pattern.subn(lambda m: m[0][0] + "*" * (len(m[0]) - 1), text[:cut])
            events = [HookEvent(type="masked", message=f"{n} word(s) masked")] if n else []
            yield TextVerdict(release=TextRelease(text=masked, keep=text[cut:]), events=events)


class ConvertTemperature(text_filter_pb2_grpc.ToolServicer):
    async def Call(self, request, context):
        if request.name != "convert_temperature":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no tool {request.name!r} here")
        celsius = json.loads(request.arguments).get("celsius")
        if not isinstance(celsius, int | float):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "celsius must be a number")
        return ToolResult(content=json.dumps({"fahrenheit": celsius * 9 / 5 + 32}))


async def serve(address: str = "127.0.0.1:0", words=DEFAULT_WORDS) -> tuple[grpc.aio.Server, int]:
    """Start the server; returns it and its port (a free one for port 0)."""
    server = grpc.aio.server()
    text_filter_pb2_grpc.add_TextFilterServicer_to_server(MaskWords(words), server)
    text_filter_pb2_grpc.add_ToolServicer_to_server(ConvertTemperature(), server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50070)
    parser.add_argument("--words", nargs="+", default=list(DEFAULT_WORDS), help="words to mask")
    args = parser.parse_args()
    server, port = await serve(f"{args.host}:{args.port}", args.words)
    print(f"text filter and tool server on port {port}")
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
