import subprocess
import sys

import pytest

from kvstore.hashing import hash_to_str, page_hashes, root_hash


def test_only_full_pages_get_hashes():
    assert len(page_hashes(list(range(33)), 16, "m")) == 2
    assert page_hashes(list(range(15)), 16, "m") == []


def test_hash_chains_so_a_page_depends_on_every_token_before_it():
    a = page_hashes([1] * 16 + [2] * 16, 16, "m")
    b = page_hashes([9] + [1] * 15 + [2] * 16, 16, "m")
    assert a[0] != b[0] and a[1] != b[1]


def test_extending_with_parent_equals_hashing_at_once():
    tokens = list(range(100, 164))
    whole = page_hashes(tokens, 16, "m")
    first = page_hashes(tokens[:32], 16, "m")
    rest = page_hashes(tokens[32:], 16, "m", parent=first[-1])
    assert first + rest == whole


def test_model_id_separates_models():
    assert page_hashes([1] * 16, 16, "a") != page_hashes([1] * 16, 16, "b")
    assert root_hash("a") != root_hash("b")


def test_hashes_are_stable_across_processes():
    # Python's hash() is salted per process; ours must not be.
    code = "from kvstore.hashing import page_hashes; print(page_hashes(list(range(32)), 16, 'm'))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(page_hashes(list(range(32)), 16, "m"))


def test_hash_to_str_is_fixed_width_hex():
    s = hash_to_str(page_hashes([5] * 4, 4, "m")[0])
    assert len(s) == 32 and int(s, 16) >= 0


def test_page_size_must_be_positive():
    with pytest.raises(ValueError, match="page_size"):
        page_hashes([1], 0, "m")
