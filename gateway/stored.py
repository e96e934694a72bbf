"""Responses an upstream stores (the Responses API's `store`, on by default) that passed
through this gateway: whose key's each is, and how large a prompt a request continuing it
(`previous_response_id`) sends again.

That prompt is billed by the upstream but never seen here: the stored conversation, which is
the earlier response's input and output. Admission holds its size for a response known here
(`size`), and a stated size for one not known (made before a restart, by another worker or
process, or outside the gateway), as for a file sent by id. A response known to be another
key's is not found for this one: its conversation is that key's data.
"""

from __future__ import annotations

from gateway.errors import NotFound
from gateway.media import FILE_BY_ID, Estimate

__all__ = ["UNKNOWN_CONVERSATION", "StoredResponses"]

# What a stored conversation not known here is held as: as a file sent by id (a few turns
# likely, a long conversation at most).
UNKNOWN_CONVERSATION = FILE_BY_ID
# Responses remembered at once (about 150 bytes each); past it the oldest are forgotten, and
# held as unknown if continued.
MOST_REMEMBERED = 100_000
# The longest response id remembered (OpenAI's are about 50 characters): a longer one, from a
# hostile upstream, would make the map cost its length each; it is held as unknown.
LONGEST_ID = 256


class StoredResponses:
    """Response id -> (its key's id, its input and output tokens), the oldest forgotten first."""

    __slots__ = ("_known", "_most")

    def __init__(self, most: int = MOST_REMEMBERED) -> None:
        self._known: dict[str, tuple[str | None, int]] = {}
        self._most = most

    def remember(self, response_id: str, key_id: str | None, tokens: int) -> None:
        """A response relayed for `key_id`, whose prompt and output took `tokens`. An id
        already known keeps its first key: an upstream that answers another key with it
        (the same id again) neither takes the conversation from its key nor gives it away."""
        if len(response_id) > LONGEST_ID:
            return
        known = self._known
        found = known.pop(response_id, None)  # (a response id seen again goes last)
        if found is not None and found[0] != key_id:
            known[response_id] = found
            return
        if len(known) >= self._most:
            del known[next(iter(known))]
        known[response_id] = (key_id, tokens)

    def prompt(self, response_id: str, key_id: str | None) -> Estimate:
        """What continuing `response_id` sends upstream again, for `key_id`.

        Raises:
            NotFound: the response is known to be another key's.
        """
        found = self._known.get(response_id)
        if found is None:
            return UNKNOWN_CONVERSATION
        owner, tokens = found
        if owner != key_id:
            raise NotFound(
                f"Previous response with id '{response_id[:100]}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return Estimate(tokens, tokens)
