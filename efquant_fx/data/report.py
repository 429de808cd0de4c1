"""What happened to the user's images: counted and shown, so bad data never passes silently."""

from __future__ import annotations

from dataclasses import dataclass, field

SHOW_PATHS = 5
"""How many unreadable paths a report keeps for display."""


@dataclass
class DataReport:
    """Counts from listing, subset selection and validation of a fine-tuning set.

    ``listed``: entries found (files in the folder / lines in the list / image records);
    ``selected``: kept by the subset selector; ``loaded``: selected and readable (the dataset's length);
    ``unreadable``: selected but not decodable (dropped at construction, first paths in
    ``unreadable_paths``); ``ignored``: folder files skipped because their extension is not an image;
    ``substituted``: reads that failed later, during training, and were replaced by another sample
    (counted in the process that read them: DataLoader workers keep their own count);
    ``notes``: shortfalls and other things the user should know (e.g. fewer images than asked).
    """

    source: str
    kind: str
    listed: int = 0
    selected: int = 0
    loaded: int = 0
    unreadable: int = 0
    unreadable_paths: list[str] = field(default_factory=list)
    ignored: int = 0
    substituted: int = 0
    identities: int = 0
    notes: list[str] = field(default_factory=list)

    def add_unreadable(self, path: str, reason: str = "") -> None:
        """Count one unreadable entry; keep the first few for the summary."""
        self.unreadable += 1
        if len(self.unreadable_paths) < SHOW_PATHS:
            self.unreadable_paths.append(f"{path} ({reason})" if reason else path)

    def summary(self) -> str:
        """A few lines for the console and the run log."""
        lines = [
            f"data ({self.kind}) {self.source}: {self.loaded} images of {self.identities} identities "
            f"(listed {self.listed}, selected {self.selected}, unreadable {self.unreadable}"
            + (f", ignored non-image files {self.ignored}" if self.ignored else "")
            + (f", substituted at read time {self.substituted}" if self.substituted else "")
            + ")"
        ]
        if self.unreadable_paths:
            more = (
                f" (+{self.unreadable - len(self.unreadable_paths)} more)"
                if self.unreadable > SHOW_PATHS
                else ""
            )
            lines.append("  unreadable: " + "; ".join(self.unreadable_paths) + more)
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
