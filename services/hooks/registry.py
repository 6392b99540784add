"""The hook stage from the deployment config: filters and tools named by entry point or import path, with options.

    hooks:
      fallback: "Sorry, I can't help with that."
      max_tool_steps: 4
      filters:                                   # in order; the Thinker's text goes through each
        - use: redact                            # an `omni.text_filters` entry point ...
          options: {words: [acme], replacement: "[company]", ignore_case: true}
        - use: sentences
        - use: mypackage.guards:ToxicityFilter   # ... or an import path `module:Name`
          name: toxicity
          on_error: skip
          lookahead: 2
          options: {threshold: 0.8}
        - use: remote
          options: {target: "guard.internal:50070", deadline_s: 0.2, on_failure: fail_open}
      tools:
        - use: retrieve                          # an `omni.tools` entry point or an import path
          options: {corpus: /data/docs.jsonl, k: 3}
        - use: mypackage.tools:get_weather       # a function: its arguments are the call's
          description: The weather in a city.
          parameters: {type: object, properties: {city: {type: string}}, required: [city]}
        - name: stock_price                      # a gRPC endpoint serving omni.v1.Tool
          target: "tools.internal:50071"
          description: ...
          parameters: {...}

A class is instantiated with its `options`; a function is used as it is. An option value written as
`{use: module:Name, options: {...}}` is built the same way first (e.g. `retriever:` of `retrieve`, a user's vector
store).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.errors import InvalidInput
from services.hooks.remote import grpc_tool
from services.hooks.sdk import DEFAULT_FALLBACK, FilterChain, Link, TextFilter
from services.hooks.tools import Tool, ToolRegistry, python_tool

FILTERS_GROUP = "omni.text_filters"
TOOLS_GROUP = "omni.tools"


class FilterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy instead of vanishing

    use: str = Field(description="an `omni.text_filters` entry point (redact, block, sentences, remote) or an "
                                 "import path `package.module:Class` of a TextFilter subclass")
    name: str | None = Field(None, description="the link's name in events, logs and errors; default: `use`")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the filter's class")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="when the filter raises: end the request with an error, or skip the filter from then on")
    lookahead: int = Field(0, ge=0, description="pieces the filter sees beyond the text it decides on")


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy instead of vanishing

    use: str | None = Field(None, description="an `omni.tools` entry point (retrieve) or an import path "
                                              "`package.module:name` of a function or class")
    target: str | None = Field(None, description="host:port of a gRPC server of omni.v1.Tool")
    name: str | None = Field(None, description="the name the Thinker calls; default: the callable's")
    description: str | None = Field(None, description="what the tool does, for the Thinker; default: the callable's")
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments; default: the "
                                                                "callable's `parameters`")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a tool class")
    timeout_s: float = Field(30.0, gt=0, description="deadline of one call")

    @model_validator(mode="after")
    def _one_kind(self) -> ToolSpec:
        if (self.use is None) == (self.target is None):
            raise ValueError("a tool needs exactly one of `use` (Python) and `target` (gRPC)")
        if self.target is not None and not (self.name and self.description and self.parameters):
            raise ValueError("a gRPC tool needs `name`, `description` and `parameters`")
        return self


class HooksConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy instead of vanishing

    filters: list[FilterSpec] = Field(default_factory=list, description="the filter chain, in order")
    tools: list[ToolSpec] = Field(default_factory=list, description="tools the Thinker may call")
    fallback: str = Field(DEFAULT_FALLBACK, description="what the answer says when a filter blocks it")
    max_tool_steps: int = Field(4, ge=0, description="Thinker continuations with tool results per turn")


def build_chain(config: HooksConfig | Mapping[str, Any]) -> FilterChain:
    config = config if isinstance(config, HooksConfig) else HooksConfig.model_validate(config)
    return FilterChain([build_link(s) for s in config.filters], fallback=config.fallback,
                       tools=ToolRegistry(build_tool(s) for s in config.tools), max_tool_steps=config.max_tool_steps)


def build_link(spec: FilterSpec) -> Link:
    cls = load(spec.use, FILTERS_GROUP)
    if not (isinstance(cls, type) and issubclass(cls, TextFilter)):
        raise InvalidInput(f"text filter {spec.use!r} is {cls!r}, not a TextFilter subclass")
    return Link(_construct(cls, spec.options, spec.use), spec.name or spec.use, spec.on_error, spec.lookahead)


def build_tool(spec: ToolSpec) -> Tool:
    if spec.target is not None:
        return grpc_tool(spec.target, name=spec.name, description=spec.description, parameters=spec.parameters,
                         timeout_s=spec.timeout_s)
    obj = load(spec.use, TOOLS_GROUP)
    if isinstance(obj, type):
        obj = _construct(obj, spec.options, spec.use)
    elif spec.options:
        raise InvalidInput(f"tool {spec.use!r} is a function: it takes no options")
    return python_tool(obj, name=spec.name, description=spec.description, parameters=spec.parameters,
                       timeout_s=spec.timeout_s)


def load(ref: str, group: str | None = None) -> Any:
    """The object an import path `package.module:Name` names, or the entry point `ref` of `group`."""
    if ":" in ref:
        module, _, attr = ref.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise InvalidInput(f"cannot load {ref!r}: {e}") from None
        return obj
    found = entry_points(group=group, name=ref) if group else ()
    if not found:
        known = sorted(ep.name for ep in entry_points(group=group)) if group else []
        raise InvalidInput(f"unknown name {ref!r}: not an import path `module:Name`"
                           + (f" nor a {group} entry point ({', '.join(known) or 'none installed'})" if group else ""))
    return next(iter(found)).load()


def _construct(cls: type, options: Mapping[str, Any], ref: str) -> Any:
    try:
        return cls(**{k: _build(v) for k, v in options.items()})
    except TypeError as e:
        raise InvalidInput(f"{ref}: bad options: {e}") from None


def _build(value: Any) -> Any:
    """An option value; `{use: module:Name, options: {...}}` is an object built from the import path."""
    if isinstance(value, Mapping) and set(value) <= {"use", "options"} and isinstance(value.get("use"), str):
        obj, options = load(value["use"]), value.get("options", {})
        if isinstance(obj, type):
            return _construct(obj, options, value["use"])
        if options:
            raise InvalidInput(f"{value['use']} is not a class: it takes no options")
        return obj
    return value
