"""Typed keys for the objects the agent keeps on its aiohttp application.

Route modules reach shared state with ``request.app[VMS]`` etc.
"""

from __future__ import annotations

from aiohttp import web

from novacron.agent.config import AgentConfig
from novacron.agent.metrics import AgentMetrics
from novacron.agent.vm.accel import AccelDetector
from novacron.agent.vm.manager import VMManager

CONFIG = web.AppKey("novacron_agent_config", AgentConfig)
VMS = web.AppKey("novacron_agent_vms", VMManager)
ACCEL = web.AppKey("novacron_agent_accel", AccelDetector)
METRICS = web.AppKey("novacron_agent_metrics", AgentMetrics)
