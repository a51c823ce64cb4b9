"""The status page: what the daemons are doing, served on the `[metrics] listen` address.

    GET /              the newest jobs (filter by state, search by name), the daemons, the
                       webhook endpoints' health
    GET /jobs/ID       one job: its timeline, remote batches, files, webhook deliveries
    GET /static/NAME   the page's style sheet and its refresh script (shipped in the package)

Server-rendered HTML that works without JavaScript; the script only refreshes it. Nothing on
it comes from outside the machine (no CDN, no font), so it works with no internet.

`queries.py` reads the store (read-only, bounded), `pages.py` renders (every value escaped,
every URL redacted; progress as `batchd jobs` figures it), `routes.py` serves them, and
`auth.py` asks for `[metrics] token_file`'s token on every route of the listener.
"""

from batchd.status.auth import TokenGate
from batchd.status.routes import status_routes

__all__ = ["TokenGate", "status_routes"]
