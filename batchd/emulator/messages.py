"""Anthropic's Messages requests in the emulator: their rules, and their translation to and
from the OpenAI-compatible chat completions an upstream server answers.

The upstream engine translates rather than forwards: the servers people run it against
(vLLM, llama.cpp, Ollama, a hosted real-time API) speak OpenAI's chat completions, and one
upstream then serves every dialect of the emulator. What translates: `system` (a string or
text blocks) as a leading system message, each message's text (a string or text blocks),
`max_tokens`, `temperature`, `top_p`, `stop_sequences` (as `stop`); the answer's text as one
text block, its finish reason as `stop_reason`, its token counts as Anthropic's `usage`.
What does not (tools, images, `top_k`) is left out of the upstream request.
"""

from __future__ import annotations

from typing import Any

#: OpenAI finish reasons → Anthropic stop reasons.
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


def message_params_problem(params: dict[str, Any]) -> str | None:
    """Why a Messages request cannot run (Anthropic's rules of DESIGN §3), or None."""
    model = params.get("model")
    if not isinstance(model, str) or not model:
        return "model: Field required"
    tokens = params.get("max_tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        return "max_tokens: must be an integer of at least 1"
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "messages: must be a non-empty list of objects"
    if params.get("stream"):
        return "stream: streaming is not supported in a message batch"
    return None


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the `text` of its text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        blocks = [block for block in content if isinstance(block, dict) and block.get("type", "text") == "text"]
        texts = [block.get("text") for block in blocks]
        return "\n".join(t for t in texts if isinstance(t, str))
    return ""


def to_chat(params: dict[str, Any]) -> dict[str, Any]:
    """A valid Messages request (see message_params_problem) as a chat completions request."""
    messages: list[dict[str, Any]] = []
    system = params.get("system")
    if system is not None and text_of(system):
        messages.append({"role": "system", "content": text_of(system)})
    for message in params["messages"]:
        messages.append({"role": str(message.get("role", "user")), "content": text_of(message.get("content"))})
    chat: dict[str, Any] = {"model": params["model"], "messages": messages, "max_tokens": params["max_tokens"]}
    for key in ("temperature", "top_p"):
        if key in params:
            chat[key] = params[key]
    if isinstance(params.get("stop_sequences"), list):
        chat["stop"] = params["stop_sequences"]
    return chat


def from_chat(reply: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat completion as a Message (one text block; Anthropic's usage, no cache)."""
    choices = reply.get("choices")
    first: dict[str, Any] = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    text = content if isinstance(content, str) else ""
    usage = reply.get("usage")
    counts = [usage.get(key) if isinstance(usage, dict) else None for key in ("prompt_tokens", "completion_tokens")]
    input_tokens, output_tokens = (c if isinstance(c, int) and not isinstance(c, bool) else 0 for c in counts)
    reply_id = reply.get("id")
    return {
        "id": f"msg_{reply_id}" if isinstance(reply_id, str) and reply_id else "msg_upstream",
        "type": "message",
        "role": "assistant",
        "model": reply.get("model") if isinstance(reply.get("model"), str) else model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": _STOP_REASONS.get(str(first.get("finish_reason")), "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def upstream_error_message(body: dict[str, Any], status: int) -> str:
    """The message of an upstream error body (OpenAI's shape, or anything else)."""
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return f"upstream answered HTTP {status}"
