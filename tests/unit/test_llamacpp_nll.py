"""llama.cpp's per-token NLL from its logits rows: what tailor.eval.ppl computes on the PyTorch side."""
import numpy as np
import pytest
from scipy.special import log_softmax

from tailor.export.llamacpp import _nll


def test_nll_is_minus_log_softmax_at_the_next_token():
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((37, 4099)) * 12 + 40).astype(np.float32)  # large logits: a max-shift matters
    targets = rng.integers(0, 4099, 37)
    want = -log_softmax(scores.astype(np.float64), axis=-1)[np.arange(37), targets]
    got = _nll(scores, targets)
    assert got.shape == (37,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-5)
    # each row is scored at its own target, not a neighbour's
    assert not np.allclose(_nll(scores, np.roll(targets, 1)), want, rtol=1e-3)


def test_nll_reads_a_strided_view_of_the_scores_buffer():
    """llama-cpp-python's `scores` is an (n_ctx, V) buffer; the caller passes its first T-1 rows."""
    buf = np.random.default_rng(1).standard_normal((64, 300)).astype(np.float32)
    view = buf[:10]
    np.testing.assert_allclose(_nll(view, [3] * 10), -log_softmax(buf[:10].astype(np.float64), -1)[:, 3], rtol=1e-5)
    with pytest.raises(Exception):
        _nll(view, [3] * 9)  # one target a row
    # any integer targets, as the numpy indexing took them
    np.testing.assert_allclose(_nll(view, np.full(10, 3, np.int32)), _nll(view, [3] * 10))
