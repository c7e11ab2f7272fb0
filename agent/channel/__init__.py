"""The agent-to-agent data channel: TCP, mutually authenticated with the cluster
secret, one X25519 key agreement per connection (= per migration).

``handshake`` authenticates and derives keys; ``records`` carries encrypted
control messages and native page-stream frames over the authenticated stream;
``server`` accepts peers on the agent's ``data_port`` and refuses any that fail
authentication before anything else happens.

The cluster secret proves fleet membership only; with TLS configured the
connection is also mutual TLS with the fleet CA, and ``Channel.peer_identity``
is the peer's host name from its certificate. Which host may send which VM
here is decided by the coordinator: the first message on a channel must be its
signed grant naming this host as destination (``novacron.grants``, checked in
``novacron.agent.migration.manager``), used once.
"""

from novacron.agent.channel.handshake import AuthError, SessionKeys
from novacron.agent.channel.records import Channel, ChannelClosed, ProtocolError, Record
from novacron.agent.channel.server import ChannelServer, connect

__all__ = [
    "AuthError",
    "Channel",
    "ChannelClosed",
    "ChannelServer",
    "ProtocolError",
    "Record",
    "SessionKeys",
    "connect",
]
