"""A GGUF file's metadata, read with the `gguf` package: which file a model path names, and its
fields. No kvfleet imports: `workers.models.config` (the model's configuration from the metadata) and
`workers.models.gguf` (its tensors) both build on it."""

from __future__ import annotations

from pathlib import Path

SUPPORTED_ARCHITECTURES = ("llama",)


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the one `*.gguf` of a directory that has no
    config.json (a Hugging Face directory wins). None when `path` is no GGUF model."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} GGUF files ({', '.join(f.name for f in files)}): name one")
    return files[0] if files else None


def open_reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as e:  # a dependency of kvfleet; this only helps a broken install
        raise ImportError("reading a GGUF model needs the `gguf` package (pip install gguf)") from e
    return GGUFReader(str(path))


def field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()
