"""The ML lifecycle as tools for Keel's agents and MCP clients: the catalog (one thin tool per service call,
scoped and audited) and the ``tools`` audit trail. The MCP server over the same registry is
:mod:`lifecycle.tools.mcp`."""

from lifecycle.tools.audit import ToolAudit, open_tool_audit
from lifecycle.tools.catalog import LifecycleServices, LifecycleTool, lifecycle_tools

__all__ = ["LifecycleServices", "LifecycleTool", "ToolAudit", "lifecycle_tools", "open_tool_audit"]
