"""Where exported files go: re-exported from :mod:`efquant_fx.files`, the package's one home for writes."""

from efquant_fx.files import atomic_path, atomic_write_text, output_dir, undo_new_folders

__all__ = ["atomic_path", "atomic_write_text", "output_dir", "undo_new_folders"]
