"""The hook stage: user code between the Thinker, which writes the answer, and the Talker, which speaks it.

    sdk       filters, verdicts, the chain and its per-request session
    stage     the hook stage as the conductor calls it: in process (LocalHooks) or the hooks application
    builtin   redact, block (Blocklist), sentences
    remote    a filter or a tool served over gRPC (protos/omni/v1/text_filter.proto)
    tools     tool calls in the Thinker's text, tools, the `retrieve` RAG tool
    registry  the chain from the deployment config
"""

from services.hooks.builtin import Blocklist, Redact, Sentences
from services.hooks.registry import FilterSpec, HooksConfig, ToolSpec, build_chain
from services.hooks.remote import RemoteFilter, grpc_tool
from services.hooks.sdk import (
    DEFAULT_FALLBACK,
    Block,
    FilterChain,
    FilterFailed,
    FilterTurn,
    Hold,
    HookContext,
    HookEvent,
    HookSession,
    Link,
    Release,
    Released,
    TextFilter,
    Verdict,
)
from services.hooks.stage import HookStage, HookTurn, LocalHooks
from services.hooks.tools import (
    BM25Retriever,
    Passage,
    Retrieve,
    Retriever,
    Tool,
    ToolCall,
    ToolRegistry,
    python_tool,
    run_tools,
)

__all__ = [
    "DEFAULT_FALLBACK", "BM25Retriever", "Block", "Blocklist", "FilterChain", "FilterFailed", "FilterSpec",
    "FilterTurn", "Hold", "HookContext", "HookEvent", "HookSession", "HookStage", "HookTurn", "HooksConfig", "Link",
    "LocalHooks", "Passage", "Redact", "Release", "Released", "RemoteFilter", "Retrieve", "Retriever", "Sentences",
    "TextFilter", "Tool", "ToolCall", "ToolRegistry", "ToolSpec", "Verdict", "build_chain", "grpc_tool",
    "python_tool", "run_tools",
]
