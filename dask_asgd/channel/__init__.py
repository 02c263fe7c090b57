"""Worker-to-worker publish/subscribe on Dask's comm layer: latest-wins
mailboxes, bounded sends in flight, timed sends, validated payloads."""

from ._links import Outgoing, PeerLink, SendCounts
from ._mailbox import Mailbox, Message
from ._plugin import Channel, get_channel
from ._spec import PayloadSpec

__all__ = ["Channel", "Mailbox", "Message", "Outgoing", "PayloadSpec", "PeerLink", "SendCounts", "get_channel"]
