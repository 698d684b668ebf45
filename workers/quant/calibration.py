"""The calibration text shipped with kvfleet (workers/quant/data/, PSF-licensed CPython docstrings
and code, see its README) cut into token sequences for calibrated quantization (int4-awq)."""

from __future__ import annotations

from pathlib import Path

import torch

CALIBRATION_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"


class CalibrationTextError(ValueError):
    pass


def tokenize_windows(tokenizer, text: str, num_seqs: int, seq_len: int, source: str) -> list[torch.Tensor]:
    """The first `num_seqs` consecutive, non-overlapping windows of `seq_len` tokens of `text`
    (int64, 1-D), tokenized once as a whole so that no window starts mid-word by our doing."""
    if num_seqs < 1 or seq_len < 2:
        raise CalibrationTextError(f"need num_seqs >= 1 and seq_len >= 2, got {num_seqs} and {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // seq_len
    if available < num_seqs:
        raise CalibrationTextError(
            f"{source} holds {len(ids)} tokens: {available} sequences of {seq_len}, not {num_seqs}; "
            f"ask for fewer or shorter sequences"
        )
    t = torch.tensor(ids[: num_seqs * seq_len], dtype=torch.int64)
    return list(t.reshape(num_seqs, seq_len))


def load_calibration_batches(tokenizer, num_seqs: int = 16, seq_len: int = 512) -> list[torch.Tensor]:
    """`num_seqs` token sequences of `seq_len` from the shipped calibration text (about 40k tokens
    in all for a 49k-word vocabulary: the default takes 8k, which keeps calibration on a CPU short)."""
    text = CALIBRATION_TEXT.read_text(encoding="utf-8")
    return tokenize_windows(tokenizer, text, num_seqs, seq_len, f"the calibration text {CALIBRATION_TEXT.name}")
