import random
import time
import tracemalloc

import pytest

from cluster.demo.model import _MULTILINGUAL
from workers.detokenizer import IncrementalDetokenizer

ROCKET = "🚀"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes=(1,)) -> tuple[list[str], bool]:
    """Feed `ids` in chunks of the given sizes (cycled); returns the deltas, flush included unless stopped."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = chunk_sizes[k % len(chunk_sizes)]
        text, stopped = detok.add(ids[i : i + n])
        deltas.append(text)
        if stopped:
            return deltas, True
        i, k = i + n, k + 1
    deltas.append(detok.flush())
    return deltas, False


def token_starts(tokenizer, ids: list[int]) -> set[int]:
    """Char offsets where each token's text begins (for ASCII text, where tokens split no character)."""
    starts, pos = set(), 0
    for i in ids:
        starts.add(pos)
        pos += len(tokenizer.decode([i]))
    return starts


# -- the invariant: deltas concatenate to a full decode of the output ------------------------------


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_full_decode_for_random_ids(tokenizer, skip_special_tokens):
    vocab = len(tokenizer)
    for seed in range(300):
        rng = random.Random(seed)
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(8))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
        deltas, stopped = stream(detok, output, chunk_sizes=(rng.randrange(1, 4), rng.randrange(1, 6)))
        expected = tokenizer.decode(output, skip_special_tokens=skip_special_tokens)
        assert not stopped
        assert "".join(deltas) == expected, f"seed {seed}"
        assert detok.text == expected


@pytest.mark.parametrize("chunk_sizes", [(1,), (3, 1, 2, 5), (7, 2)], ids=["one-at-a-time", "uneven", "big-chunks"])
def test_deltas_concatenate_to_full_decode_for_multilingual_text(tokenizer, chunk_sizes):
    prompt = encode(tokenizer, "Translate:")
    output = encode(tokenizer, _MULTILINGUAL * 2)
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, prompt), output, chunk_sizes)
    assert "".join(deltas) == _MULTILINGUAL * 2


def test_no_delta_contains_a_replacement_char_when_the_full_decode_has_none(tokenizer):
    output = encode(tokenizer, _MULTILINGUAL)
    assert "\ufffd" not in tokenizer.decode(output)
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in output)  # characters really are split
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, []), output)
    assert [d for d in deltas if "\ufffd" in d] == []


def test_partial_character_is_held_until_its_last_byte_arrives(tokenizer):
    ids = encode(tokenizer, "go" + ROCKET)
    assert len(ids) >= 3 and tokenizer.decode(ids[-1:]) == "\ufffd"  # the rocket's bytes span tokens
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[:-1]) == ("go", False)
    assert detok.add(ids[-1:]) == (ROCKET, False)
    assert detok.flush() == ""


def test_text_before_an_incomplete_character_in_the_same_token_window_is_not_delayed(tokenizer):
    ids = encode(tokenizer, "end" + ROCKET)
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[:-1])[0] == "end"


def test_incomplete_bytes_at_finish_are_flushed_as_a_replacement_char(tokenizer):
    ids = encode(tokenizer, "go" + ROCKET)[:-1]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids) == ("go", False)
    assert detok.flush() == tokenizer.decode(ids)[len("go") :] == "\ufffd"


def test_prompt_ending_inside_a_character_does_not_join_the_output_bytes(tokenizer):
    ids = encode(tokenizer, "go" + ROCKET)
    prompt, output = ids[:-1], ids[-1:]  # the prompt holds the rocket's first bytes
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, prompt), [*output, *encode(tokenizer, " ok")])
    assert "".join(deltas) == tokenizer.decode(output + encode(tokenizer, " ok")) == "\ufffd ok"


def test_first_output_token_keeps_its_leading_space_under_a_decoder_that_strips_one(tokenizer):
    class LeadingSpaceStrippingTokenizer:  # decodes as SentencePiece does: no space before the first word
        all_special_ids = tokenizer.all_special_ids
        convert_ids_to_tokens = staticmethod(tokenizer.convert_ids_to_tokens)

        def convert_tokens_to_string(self, tokens):
            return tokenizer.convert_tokens_to_string(tokens).removeprefix(" ")

    detok = IncrementalDetokenizer(LeadingSpaceStrippingTokenizer(), encode(tokenizer, "Say Hello"))
    assert detok.add(encode(tokenizer, " world")) == (" world", False)


def test_each_add_decodes_a_small_window_not_the_whole_output(tokenizer):
    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.all_special_ids, self.longest = inner, inner.all_special_ids, 0

        def convert_ids_to_tokens(self, ids):
            return self.inner.convert_ids_to_tokens(ids)

        def convert_tokens_to_string(self, tokens):
            self.longest = max(self.longest, len(tokens))
            return self.inner.convert_tokens_to_string(tokens)

    counting = CountingTokenizer(tokenizer)
    output = encode(tokenizer, _MULTILINGUAL * 10)
    deltas, _ = stream(IncrementalDetokenizer(counting, encode(tokenizer, "a long prompt " * 20)), output)
    assert "".join(deltas) == _MULTILINGUAL * 10
    assert counting.longest <= 8


# -- stop strings ---------------------------------------------------------------------------------


def test_stop_string_is_excluded_and_reports_stopped_at_its_first_occurrence(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["world"])
    deltas, stopped = stream(detok, encode(tokenizer, "hello world, hello world"))
    assert stopped
    assert deltas[-1] == "" and "".join(deltas) == detok.text == "hello "  # "w" was never emitted early


def test_stop_string_spanning_several_tokens_is_found(tokenizer):
    text, stop = "The page cache holds keys and values.", "cache holds"
    ids = encode(tokenizer, text)
    starts = token_starts(tokenizer, ids)
    assert sum(text.index(stop) <= s < text.index(stop) + len(stop) for s in starts) >= 2
    deltas, stopped = stream(IncrementalDetokenizer(tokenizer, [], stop=[stop]), ids)
    assert stopped and "".join(deltas) == "The page "


def test_stop_string_starting_in_the_middle_of_a_token_is_found(tokenizer):
    text, stop = "The page cache holds keys and values.", "alu"
    ids = encode(tokenizer, text)
    assert text.index(stop) not in token_starts(tokenizer, ids)
    deltas, stopped = stream(IncrementalDetokenizer(tokenizer, [], stop=[stop]), ids)
    assert stopped and "".join(deltas) == "The page cache holds keys and v"


def test_stop_string_inside_one_big_chunk_cuts_the_rest_of_the_chunk(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["holds"])
    assert detok.add(encode(tokenizer, "The page cache holds keys.")) == ("The page cache ", True)


@pytest.mark.parametrize("chunk_sizes", [(1,), (2, 5, 1)])
def test_any_substring_as_stop_cuts_the_text_at_its_first_occurrence(tokenizer, chunk_sizes):
    text = _MULTILINGUAL * 2
    ids = encode(tokenizer, text)
    rng = random.Random(0)
    for _ in range(100):
        start = rng.randrange(len(text) - 1)
        stop = text[start : start + rng.randrange(1, 8)]
        deltas, stopped = stream(IncrementalDetokenizer(tokenizer, [], stop=[stop]), ids, chunk_sizes)
        assert stopped and "".join(deltas) == text[: text.index(stop)], repr(stop)


def test_with_several_stop_strings_the_earliest_in_the_text_wins(tokenizer):
    ids = encode(tokenizer, "alpha beta gamma delta")
    detok = IncrementalDetokenizer(tokenizer, [], stop=["delta", "gamma", "beta"])
    deltas, stopped = stream(detok, ids)
    assert stopped and "".join(deltas) == "alpha "


def test_overlapping_stop_strings_cut_where_the_first_one_completes(tokenizer):
    # "bc" completes before "abcd" does, as a token-at-a-time stream would see it, whatever the chunking.
    for chunk_sizes in [(1,), (100,)]:
        detok = IncrementalDetokenizer(tokenizer, [], stop=["abcd", "bc"])
        deltas, stopped = stream(detok, encode(tokenizer, "xx abcd"), chunk_sizes)
        assert stopped and "".join(deltas) == "xx a"


def test_held_back_start_of_a_stop_string_is_released_by_flush(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["end.", "ends!"])
    for token_id in encode(tokenizer, "The end"):
        assert detok.add([token_id])[1] is False
    assert detok.text == "The "  # "end" could still become "end." or "ends!"
    assert detok.flush() == "end"
    assert detok.text == "The end"


def test_text_that_stops_being_a_stop_prefix_is_released_by_the_next_add(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["end."])
    deltas, stopped = stream(detok, encode(tokenizer, "The end is near"))
    assert not stopped and deltas[-1] == "" and "".join(deltas) == "The end is near"


def test_stop_string_followed_by_an_incomplete_character_stops_without_waiting_for_it(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["end"])
    assert detok.add(encode(tokenizer, "The end" + ROCKET)[:-1]) == ("The ", True)


def test_a_1_mb_stop_string_costs_memory_and_time_bounded_by_the_text_streamed(tokenizer):
    # Every prefix of every stop string was once kept (a 1 MB stop string asked for ~500 GB): now the
    # matcher's table grows only as far as the output has matched. The output here is long runs of
    # the stop string's own start, so the table and the held-back text do grow, with the output.
    stop = "ab" * 500_000
    output = encode(tokenizer, ("ab" * 300 + "x") * 4)
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        detok = IncrementalDetokenizer(tokenizer, [], stop=[stop, "zz"])
        deltas, stopped = stream(detok, output, chunk_sizes=(3,))
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not stopped and "".join(deltas) == tokenizer.decode(output)
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # the stop string itself is 1 MB, made before
    assert elapsed < 10, f"{elapsed:.1f} s"  # ~0.1 s on a quiet 2-core CPU


def test_text_that_matches_most_of_a_long_stop_string_is_held_then_released(tokenizer):
    stop = "ab" * 5_000
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    assert detok.add(encode(tokenizer, "ab" * 1_000)) == ("", False)  # could still become the stop string
    assert detok.add(encode(tokenizer, "ab" * 3_999 + "a")) == ("", False)
    assert detok.add(encode(tokenizer, "x")) == ("ab" * 4_999 + "ax", False)


def test_a_long_stop_string_that_completes_across_many_adds_stops(tokenizer):
    stop = "ab" * 5_000
    detok = IncrementalDetokenizer(tokenizer, [], stop=[stop])
    deltas, stopped = stream(detok, encode(tokenizer, "xa" + stop + "tail"), chunk_sizes=(7,))
    assert stopped and "".join(deltas) == "xa"


def test_add_after_a_stop_raises(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], stop=["b"])
    assert detok.add(encode(tokenizer, "ab"))[1]
    with pytest.raises(RuntimeError):
        detok.add(encode(tokenizer, "c"))


def test_empty_stop_string_is_rejected(tokenizer):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tokenizer, [], stop=[""])


# -- special tokens -------------------------------------------------------------------------------


def test_special_tokens_are_skipped(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = [bos, *encode(tokenizer, "hi"), eos]
    detok = IncrementalDetokenizer(tokenizer, [bos], stop=["</s>"])
    assert stream(detok, ids) == (["", "h", "i", "", ""], False)


def test_special_tokens_are_kept_when_not_skipped(tokenizer):
    ids = [tokenizer.bos_token_id, *encode(tokenizer, "hi"), tokenizer.eos_token_id]
    deltas, _ = stream(IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False), ids)
    assert "".join(deltas) == "<s>hi</s>"
