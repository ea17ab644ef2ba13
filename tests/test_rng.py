"""The project's dropout RNG (fusedformer.rng): known answers, the index mapping, statistics."""
import math

import pytest
import torch

from fusedformer import rng

# Known-answer vectors for Philox4x32-10 published with Random123 (Salmon et al., SC'11).
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    c = tuple(torch.tensor([v], dtype=torch.int64) for v in counter)
    out = rng.philox4x32(c, key)
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize("seed,offset", [(0x1234_5678_9ABC_DEF0, 5), (3, (1 << 35) + 6)])
def test_draws_follow_the_documented_mapping(seed, offset):
    """Element n draws half (offset + n) & 1 (0: the low 16 bits) of word ((offset + n) >> 1) & 3
    of the block with counter (offset + n) >> 3, written out here one element at a time."""
    draws = rng.draws(seed, offset, 19)
    k = rng.seed_key(seed)
    for n in range(19):
        i = offset + n
        block = tuple(torch.tensor([v], dtype=torch.int64) for v in ((i >> 3) & rng.MASK32, i >> 35, 0, 0))
        word = int(rng.philox4x32(block, k)[(i >> 1) & 3])
        assert int(draws[n]) == (word >> 16 if i & 1 else word & 0xFFFF)


def test_offset_is_a_shift_of_the_same_stream():
    full = rng.draws(42, 0, 1000)
    for off in (1, 3, 4, 7, 500):
        torch.testing.assert_close(rng.draws(42, off, 1000 - off), full[off:], rtol=0, atol=0)


def test_counter_high_word_is_used():
    """Offsets past 2**35 elements (2**32 blocks of eight) change the counter's second word, not
    wrap around."""
    a = rng.draws(1, 0, 64)
    b = rng.draws(1, 1 << 35, 64)
    assert not torch.equal(a, b)


def test_seeds_give_different_streams_and_same_seed_repeats():
    a, b = rng.draws(1, 0, 4096), rng.draws(2, 0, 4096)
    assert torch.equal(a, rng.draws(1, 0, 4096))
    assert (a == b).float().mean() < 0.01
    hi = rng.draws(1 + (1 << 32), 0, 4096)  # differs only in the key's high word
    assert (a == hi).float().mean() < 0.01


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_scale(p):
    n = 1 << 20
    keep = rng.keep_mask((n,), p, seed=7)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate} vs {1 - p} (5 sigma = {5 * sigma:.2e})"
    mult = rng.dropout_multiplier((n,), p, seed=7)
    assert torch.equal(mult != 0, keep)
    assert torch.allclose(mult[keep], torch.tensor(1 / (1 - p)))
    # E[mult] = 1: dropout keeps the expectation
    assert abs(mult.double().mean().item() - 1.0) < 5 * sigma / (1 - p)


def test_uniformity_and_lane_independence():
    r = rng.draws(123, 0, 1 << 18).double()
    buckets = torch.histc(r, bins=64, min=0, max=2.0**16)
    expected = r.numel() / 64
    chi2 = ((buckets - expected) ** 2 / expected).sum().item()
    assert chi2 < 120, f"chi-square {chi2:.1f} over 63 degrees of freedom"  # p ~ 1e-5 at 120
    u = r / 2.0**16 - 0.5
    for lag in (1, 2, 3, 4, 8):  # halves of a word, words of a block, the next block
        corr = (u[:-lag] * u[lag:]).mean().item() / u.var().item()
        assert abs(corr) < 0.01, f"lag-{lag} correlation {corr:.4f}"


def test_threshold_edges():
    assert rng.threshold(0.0) == 0
    assert rng.threshold(0.5) == 1 << 15
    assert rng.threshold(0.1) == 6553  # floor(0.1 * 2**16): drops 0.0999908 of the elements
    assert rng.threshold(2.0**-17) == 0  # under the draws' resolution: nothing dropped
    with pytest.raises(ValueError, match="dropout_p"):
        rng.threshold(1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        rng.threshold(-0.1)
