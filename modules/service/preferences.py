"""Each user's own choice of the options that a request may also name (the checkpoint first):
what the checkpoint dropdown and POST /options set, and what the user's requests that name none
of them use. One user's choice never reaches another's jobs.

Signed-in users have a set each. Callers who are not signed in share one set, as on a server
for one person; their jobs are still each their own. Choices are kept in the data folder, so
they outlast a restart.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from modules.app.fileio import atomic_write_json

log = logging.getLogger(__name__)

ANONYMOUS = ""  # the set of callers who are not signed in


class Preferences:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._by_user: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # a damaged file costs the choices, never the start
            log.warning("ignoring %s: %s", self.path, e)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {user: values for user, values in raw.items() if isinstance(user, str) and isinstance(values, dict)}

    def of(self, user: str | None) -> dict[str, Any]:
        """The options `user` (None: not signed in) has chosen; a copy."""
        with self._lock:
            return dict(self._by_user.get(user or ANONYMOUS, {}))

    def choose(self, user: str | None, **values: Any) -> dict[str, Any]:
        """Records `user`'s choices, by the API's (A1111's) option names, which the callers check;
        a None value forgets that option. Returns them all."""
        with self._lock:
            chosen = self._by_user.setdefault(user or ANONYMOUS, {})
            for key, value in values.items():
                if value is None:
                    chosen.pop(key, None)
                else:
                    chosen[key] = value
            if self.path is not None:
                atomic_write_json(self.path, self._by_user)
            return dict(chosen)
