"""The coordinator: fleet state, REST API, scheduler, classifier, MCP bridge."""
