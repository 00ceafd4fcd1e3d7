"""keyedbus: a trio-native event bus with one keyed worker pool shared by every topic.

Messages with the same key are handled strictly in publish order; different keys run concurrently.
"""

import logging as _logging

from ._bus import Bus as Bus
from ._bus import open_bus as open_bus
from ._config import PoolConfig as PoolConfig
from ._config import RetryPolicy as RetryPolicy
from ._config import TopicConfig as TopicConfig
from ._errors import ArgumentTypeError as ArgumentTypeError
from ._errors import BusClosedError as BusClosedError
from ._errors import ConnectionFailedError as ConnectionFailedError
from ._errors import DuplicateSubscriptionError as DuplicateSubscriptionError
from ._errors import HandlerTimeoutError as HandlerTimeoutError
from ._errors import InvalidConfigError as InvalidConfigError
from ._errors import InvalidEnvelopeError as InvalidEnvelopeError
from ._errors import InvalidHandlerError as InvalidHandlerError
from ._errors import InvalidHeaderError as InvalidHeaderError
from ._errors import InvalidKeyError as InvalidKeyError
from ._errors import InvalidTopicError as InvalidTopicError
from ._errors import KeyedBusError as KeyedBusError
from ._errors import MessageTooLargeError as MessageTooLargeError
from ._errors import MissingExtraError as MissingExtraError
from ._errors import PublishError as PublishError
from ._errors import TopicConfigConflictError as TopicConfigConflictError
from ._errors import TopicFullError as TopicFullError
from ._errors import UnsupportedEventLoopError as UnsupportedEventLoopError
from ._messages import Envelope as Envelope
from ._messages import Message as Message
from ._statistics import BusStatistics as BusStatistics
from ._subscription import Subscription as Subscription

__version__ = "0.1.0"

# The standard library's convention for libraries: keyedbus's records go nowhere until the application
# configures logging (then they propagate to its handlers as usual); without this, Python's last-resort
# handler would print every WARNING unformatted on stderr.
_logging.getLogger("keyedbus").addHandler(_logging.NullHandler())

__all__ = [
    "ArgumentTypeError",
    "Bus",
    "BusClosedError",
    "BusStatistics",
    "ConnectionFailedError",
    "DuplicateSubscriptionError",
    "Envelope",
    "HandlerTimeoutError",
    "InvalidConfigError",
    "InvalidEnvelopeError",
    "InvalidHandlerError",
    "InvalidHeaderError",
    "InvalidKeyError",
    "InvalidTopicError",
    "KeyedBusError",
    "Message",
    "MessageTooLargeError",
    "MissingExtraError",
    "PoolConfig",
    "PublishError",
    "RetryPolicy",
    "Subscription",
    "TopicConfig",
    "TopicConfigConflictError",
    "TopicFullError",
    "UnsupportedEventLoopError",
    "open_bus",
]
