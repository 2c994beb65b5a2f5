"""The HTTP routes, one APIRouter per concern: inference (``:classify``, ``:predict``), models (listing, status,
metadata) and operations (health, readiness, metrics). serve.app.ROUTERS lists the routers; their routes are matched
in that order. An endpoint is one function in one of these modules; it reaches the app's ServeState with
``serve.state.state_of(request)`` and, under /v1, requires ``serve.auth.authorize``."""
