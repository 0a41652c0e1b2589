"""One exception type for every user-facing input problem, so the CLI can print it without a traceback."""

from __future__ import annotations


class ChatSFTError(ValueError):
    """Bad input: the message names where (file, row, field) and says what to do."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.source, self.row, self.field, self.hint = source, row, field, hint
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        text = (": ".join([", ".join(where), message]) if where else message) + (
            f" — {hint}" if hint else ""
        )
        super().__init__(text)

    def with_source(self, source: str) -> ChatSFTError:
        """The same error, naming the file it came from (data prep only knows row numbers)."""
        if self.source is not None:
            return self
        return ChatSFTError(
            self.message, source=source, row=self.row, field=self.field, hint=self.hint
        )
