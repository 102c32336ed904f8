"""Adapters for tests/test_server_toolkit.py."""
import operator

from snakepit_bridge import BaseAdapter, RequestContext, tool
from snakepit_bridge.frozen import FrozenError


class ContextProbe(BaseAdapter):
    __thread_safe__ = True

    @tool(description="Try to change the frozen request context; report what happened")
    def mutate_context(self, ctx: RequestContext) -> dict:
        outcomes = {}
        for name, action in [("assign", lambda: setattr(ctx, "session_id", "other")),
                             ("delete", lambda: delattr(ctx, "request_id")),
                             ("metadata", lambda: operator.setitem(ctx.metadata, "k", "v"))]:
            try:
                action()
                outcomes[name] = "changed"
            except FrozenError as exc:
                outcomes[name] = f"FrozenError: {exc}"
            except TypeError as exc:
                outcomes[name] = f"TypeError: {exc}"
        return {"outcomes": outcomes, "session_id": ctx.session_id, "metadata": dict(ctx.metadata)}
