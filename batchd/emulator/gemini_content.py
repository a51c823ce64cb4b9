"""Gemini's GenerateContent requests in the emulator: their rule, and their translation to and
from the OpenAI-compatible chat completions the engines answer.

As for Anthropic's Messages (messages.py), the engines translate rather than forward: the echo
engine answers the chat completion it makes of the request, and the upstream engine sends that
chat completion to an OpenAI-compatible server, so one upstream serves every dialect. What
translates: `systemInstruction` as a leading system message; each of `contents` as a message
(role `model` → `assistant`, anything else → `user`) with the text of its `parts`;
`generationConfig.maxOutputTokens` → `max_tokens`, `temperature`, `topP` → `top_p`,
`stopSequences` → `stop` (snake_case spellings too); the request's `model` without its
`models/` prefix. Back: the answer's text as one candidate of role `model`, its finish reason
as `finishReason`, its token counts as `usageMetadata`, the model as `modelVersion`. What does
not translate (images, files, tools, safety settings) is left out of the upstream request.
"""

from __future__ import annotations

from typing import Any

#: The model of a request that names none (a Gemini batch's lines get the batch's model, so
#: only a request made by hand lacks one).
DEFAULT_MODEL = "gemini"
#: OpenAI finish reasons → Gemini's.
_FINISH_REASONS = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY", "tool_calls": "STOP"}
#: generationConfig keys (camelCase and snake_case) → chat completion parameters.
_GENERATION_KEYS = {
    "maxOutputTokens": "max_tokens",
    "max_output_tokens": "max_tokens",
    "temperature": "temperature",
    "topP": "top_p",
    "top_p": "top_p",
    "stopSequences": "stop",
    "stop_sequences": "stop",
}


def generate_content_problem(request: Any) -> str | None:
    """Why a GenerateContentRequest cannot run (it must be an object with a non-empty list of
    `contents` objects), or None."""
    if not isinstance(request, dict):
        return "request must be a JSON object (a GenerateContentRequest)"
    contents = request.get("contents")
    if not isinstance(contents, list) or not contents:
        return "request.contents must be a non-empty list"
    if not all(isinstance(content, dict) for content in contents):
        return "request.contents must hold Content objects"
    return None


def _field(value: dict[str, Any], camel: str, snake: str) -> Any:
    return value.get(camel, value.get(snake))


def text_of(content: Any) -> str:
    """The text of a Content: its parts' `text`, joined (other parts carry no text)."""
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list):
        return ""
    texts = [part.get("text") for part in parts if isinstance(part, dict)]
    return "".join(t for t in texts if isinstance(t, str))


def model_name(request: dict[str, Any]) -> str:
    """The request's model without the `models/` prefix."""
    model = request.get("model")
    if not isinstance(model, str) or not model:
        return DEFAULT_MODEL
    return model.removeprefix("models/")


def to_chat(request: dict[str, Any]) -> dict[str, Any]:
    """A valid GenerateContentRequest (see generate_content_problem) as a chat completions request."""
    messages: list[dict[str, Any]] = []
    system = _field(request, "systemInstruction", "system_instruction")
    if text_of(system):
        messages.append({"role": "system", "content": text_of(system)})
    for content in request["contents"]:
        role = "assistant" if content.get("role") == "model" else "user"
        messages.append({"role": role, "content": text_of(content)})
    chat: dict[str, Any] = {"model": model_name(request), "messages": messages}
    config = _field(request, "generationConfig", "generation_config")
    if isinstance(config, dict):
        for key, param in _GENERATION_KEYS.items():
            if key in config:
                chat[param] = config[key]
    return chat


def _count(usage: Any, key: str) -> int:
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def from_chat(reply: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat completion as a GenerateContentResponse (one candidate; Gemini's usageMetadata)."""
    choices = reply.get("choices")
    first: dict[str, Any] = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    usage = reply.get("usage")
    prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
    answer: dict[str, Any] = {
        "candidates": [
            {
                "content": {"role": "model", "parts": [{"text": content if isinstance(content, str) else ""}]},
                "finishReason": _FINISH_REASONS.get(str(first.get("finish_reason")), "STOP"),
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": completion,
            "totalTokenCount": prompt + completion,
        },
        "modelVersion": model,
    }
    reply_id = reply.get("id")
    if isinstance(reply_id, str) and reply_id:
        answer["responseId"] = reply_id
    return answer
