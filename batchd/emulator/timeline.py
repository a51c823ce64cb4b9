"""How long a batch spends in each state: instant by default, realistic on request."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Timeline:
    """Seconds (real time, fractions allowed) a batch spends in each state at least.

    The default is as fast as the engine answers: tests and demos should not
    wait. A real service takes minutes to hours; a user rehearsing a
    pipeline can stretch each state (`batchd emulator --validating-s 30
    --in-progress-s 300 …`) to see polling, progress and timeouts behave.
    """

    #: a new batch stays VALIDATING at least this long
    validating_s: float = 0.0
    #: IN_PROGRESS lasts at least this long; requests are spread evenly over it, so progress climbs steadily
    in_progress_min_s: float = 0.0
    #: FINALIZING (every request answered, result files being written) lasts this long
    finalizing_s: float = 0.0
    #: a batch cancelled through the OpenAI dialect stays CANCELLING this long (and at least until the
    #: worker's next step: while the emulator is paused it stays CANCELLING); when > 0, Together's
    #: cancel shows CANCELING for this long too instead of answering CANCELLED at once
    cancelling_s: float = 0.0

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{spec.name} must be a finite number of seconds >= 0, not {value!r}")
