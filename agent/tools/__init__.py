"""Tool calling and reasoning, independent of any wire format: tool definitions and calls, the
per-family output formats (how a model writes a call or its reasoning, how a conversation with
calls is shown to it), parsers that split model output into reasoning, answer and calls (whole
or streamed), and grammars that force a call.

Nothing here knows HTTP or MLX; `agent.api.tools` adapts it to the three APIs and
`agent.runtime.constraints` compiles its grammars.
"""
