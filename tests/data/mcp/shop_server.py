"""A small external MCP server for Keel's tests: an order lookup (read-only) and a refund (a side effect), with
a bearer token when served over HTTP. ``python shop_server.py stdio`` serves it over stdio."""

from __future__ import annotations

import asyncio
import sys

from fastmcp import FastMCP
from fastmcp.server.auth import AccessToken, TokenVerifier
from mcp_types import ToolAnnotations

TOKEN = "shop-secret-token"
ORDERS = {"A-100": {"id": "A-100", "status": "shipped", "total": 42.5}}
REFUNDS: list[dict] = []


class ShopVerifier(TokenVerifier):
    async def verify_token(self, token: str) -> AccessToken | None:
        return AccessToken(token=token, client_id="keel", scopes=[]) if token == TOKEN else None


def build(auth: bool = True) -> FastMCP:
    mcp = FastMCP("shop", auth=ShopVerifier() if auth else None)

    @mcp.tool(annotations=ToolAnnotations(read_only_hint=True, title="Look up an order"))
    def lookup_order(order_id: str) -> dict:
        """An order's status and total."""
        if order_id not in ORDERS:
            raise ValueError(f"no order {order_id}")
        return ORDERS[order_id]

    @mcp.tool(annotations=ToolAnnotations(destructive_hint=True))
    def refund_order(order_id: str, amount: float) -> dict:
        """Refund part or all of an order."""
        REFUNDS.append({"order_id": order_id, "amount": amount})
        return {"refunded": amount, "order_id": order_id, "refunds": len(REFUNDS)}

    return mcp


if __name__ == "__main__" and sys.argv[1:] == ["stdio"]:
    asyncio.run(build(auth=False).run_stdio_async(show_banner=False))
