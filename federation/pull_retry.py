"""A shorter first retry when Flower 1.42 pulls a message's objects before they have all arrived.

A Flower message travels as a list entry plus its objects (arrays, chunks). The sender lists the
message first and uploads its objects after it, and a SuperNode starts the ClientApp's task before it
has pulled the message from the SuperLink. Whoever pulls in between finds some objects missing, and
Flower's ``pull_objects`` then waits 1 s before asking again (then 2, 4, ... up to 10 s;
``flwr/supercore/inflatable/inflatable_utils.py``), for objects that arrive within 0.1-0.3 s here. In
the deployment that happens to:

* the ServerApp pulling a site's reply from the SuperLink: it asks every ``reply-poll`` (0.2 s), so
  it often asks while the reply's 7.3 MB arrive (in one traced SAM-Match run, ``FLWR_LOG_LEVEL=DEBUG``,
  it took each of three rounds' last reply 1.2-1.4 s after the SuperNode had sent it);
* the SuperNode pulling its message from the SuperLink;
* the ClientApp pulling the message from its SuperNode.

:func:`shorten` binds a shorter first wait (``$FEDSAMATCH_PULL_RETRY_S``, default 0.05 s; ``1`` is
Flower's) into the name one Flower module calls; the doubling, the 10 s cap and Flower's limits
(500 tries, 2 h) stay. Standard library only: the warm ClientApp server (:mod:`deploy.warm`) applies
it before dropping this project's modules.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from types import ModuleType

ENV = "FEDSAMATCH_PULL_RETRY_S"
DEFAULT_S = 0.05
MAX_S = 10.0  # Flower's cap on the wait between two tries
KEYWORD = "initial_backoff"  # of flwr's pull_objects and pull_and_inflate_object_from_tree


def first_retry_s() -> float:
    """Seconds before the first retry: ``$FEDSAMATCH_PULL_RETRY_S``, else :data:`DEFAULT_S`."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_S:
        raise ValueError(
            f"${ENV}={text!r}: must be a number of seconds in (0, {MAX_S:g}] (Flower's own is 1)"
        )
    return value


def shorten(module: ModuleType, name: str, seconds: float | None = None) -> float:
    """Make ``module.name`` (a Flower object-pulling function as that module imported it) wait
    ``seconds`` (default :func:`first_retry_s`) before its first retry of a missing object; the
    seconds bound. Calling it again rebinds the original function."""
    seconds = first_retry_s() if seconds is None else seconds
    fn = getattr(module, name)
    original = fn.func if isinstance(fn, functools.partial) else fn
    if KEYWORD not in inspect.signature(original).parameters:
        raise TypeError(f"{module.__name__}.{name} takes no {KEYWORD!r}: Flower changed; see {__name__}")
    setattr(module, name, functools.partial(original, **{KEYWORD: seconds}))
    return seconds
