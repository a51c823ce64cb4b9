"""Provider webhooks as poll hints: `POST /hooks/NAME` on the `[metrics] listen` address.

OpenAI and Gemini can announce that a batch ended with a Standard-Webhooks-signed event. A
provider with `webhook_secret` in its table (`[providers.NAME]`, or `[provider]` as `default`)
has its events taken at `/hooks/NAME`: a signed, fresh event naming one of its batches that
batchd polls makes that job due now (`JobStore.hint`), and the daemon holding it polls the
batch at once with a get of its own. The event is never believed: it only brings the poll
forward, and the poll's answer decides; polling goes on as the safety net for events that
never come.

    events.py   what an event names (pure: bytes in, a batch id or nothing out)
    route.py    the route: size cap, signature, the store write, the wake-up
"""

from batchd.hooks.route import MAX_BODY_BYTES, hook_routes, hooked_providers

__all__ = ["MAX_BODY_BYTES", "hook_routes", "hooked_providers"]
