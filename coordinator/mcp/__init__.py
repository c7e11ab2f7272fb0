"""The MCP bridge: a resilient client for claude-flow and NovaCron's own MCP server.

| module | what |
| --- | --- |
| ``stdio_session`` | one JSON-RPC session with a child process over stdio |
| ``client`` | ``ClaudeFlowClient``: timeouts, retries, restarts, health pings, the eight operations |
| ``operations`` | the table mapping the eight operations onto claude-flow v3 / v2 tools |
| ``registry`` | swarms, agents and tasks the bridge created, persisted in the coordinator's store |
| ``install`` | where ``make claude-flow`` put the pinned claude-flow |
| ``protocol`` | NovaCron's MCP server core (JSON-RPC dispatch, both protocol eras) |
| ``tools`` | NovaCron's MCP tools (hosts, VMs, placement, migration, classifier, bridge) |
| ``http`` | the Streamable HTTP transport at ``/mcp`` |
| ``stdio_server`` | the stdio transport behind ``novacron mcp`` |
"""
