"""Lookahead decoding's pure parts (logitspec/lookahead.py): the lookahead mask and depths, the
2-D window's fill and steady updates, the n-gram pool's bound, pinned by tables and checked as
properties; and the mask through real models: every lookahead input must read exactly the
context the window means (its row-0 prefix, then its column), at the right positions."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cli_helpers import load_script
from fakes import MarkovLM
from logitspec.acceptance import TargetOutput
from logitspec.decoding import GenerationConfig
from logitspec.lookahead import (
    LookaheadConfig,
    LookaheadDrafter,
    LookaheadPool,
    LookaheadWindow,
    lookahead_depths,
    lookahead_mask,
)

# ---------------------------------------------------------------------------------------------
# Settings

CONFIG_ERRORS = {
    "level-2": (dict(level=2), "level (n-gram size N) must be >= 3"),
    "window-0": (dict(window=0), "window (W) must be >= 1"),
    "guess-0": (dict(guess=0), "guess (G, n-grams verified per step) must be >= 1"),
}


@pytest.mark.parametrize("kwargs, message", CONFIG_ERRORS.values(), ids=list(CONFIG_ERRORS))
def test_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LookaheadConfig(**kwargs)


# (N, W, G) -> (verify capacity, most lookahead inputs, tree capacity)
CAPACITIES = {
    "spec-bench-5-7-7": ((5, 7, 7), (29, 27, 56)),  # steady 4 x 7 - 1; fill 9, 17, 23
    "smallest-3-1-1": ((3, 1, 1), (3, 1, 4)),  # fill 1 x 2 - 1, steady 2 x 1 - 1
    "fill-is-widest-6-1-2": ((6, 1, 2), (11, 8, 19)),  # rows x width: 1x5 2x4 3x3 4x2 5x1
    "4-3-2": ((4, 3, 2), (7, 8, 15)),  # 1x5 2x4 3x3: 2 x 4 - 1 = 3 x 3 - 1 = 8
}


@pytest.mark.parametrize("nwg, expected", CAPACITIES.values(), ids=list(CAPACITIES))
def test_config_capacities(nwg, expected):
    config = LookaheadConfig(*nwg)
    assert (config.verify_capacity, config.num_window_inputs, config.tree_capacity) == expected


# ---------------------------------------------------------------------------------------------
# The lookahead mask

def test_mask_docstring_example():
    """3 rows, width 3: cells r a b / c d e / f g h; rows of the mask are a..h."""
    names = "rabcdefgh"
    sees = {"a": "ra", "b": "rab", "c": "rc", "d": "rad", "e": "rabe",
            "f": "rcf", "g": "radg", "h": "rabeh"}
    expected = np.array([[name in sees[cell] for name in names] for cell in names[1:]])
    assert np.array_equal(lookahead_mask(3, 3), expected)
    assert lookahead_depths(3, 3).tolist() == [1, 2, 1, 2, 3, 2, 3, 4]


def intended_context(row: int, col: int) -> list[tuple[int, int]]:
    """Cell (row, col)'s context in position order: row 0 up to its column, then down it."""
    return [(0, j) for j in range(col + 1)] + [(m, col) for m in range(1, row + 1)]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 9))
def test_mask_reads_a_contiguous_context(rows, width):
    if rows * width < 2:
        return
    mask, depths = lookahead_mask(rows, width), lookahead_depths(rows, width)
    all_depths = np.concatenate([[0], depths])
    for index in range(rows * width - 1):
        row, col = divmod(index + 1, width)
        seen = np.flatnonzero(mask[index])
        assert seen.tolist() == [l * width + c for l, c in intended_context(row, col)]
        # slot order is position order, one token per position, ending at the input itself
        assert all_depths[seen].tolist() == list(range(depths[index] + 1))
        assert seen[-1] == index + 1 and depths[index] == row + col


def test_mask_and_depths_are_read_only():
    with pytest.raises(ValueError):
        lookahead_mask(2, 2)[0, 0] = False
    with pytest.raises(ValueError):
        lookahead_depths(2, 2)[0] = 9


# ---------------------------------------------------------------------------------------------
# The window

def test_window_docstring_example():
    """N = 4, W = 2; a..c the initial guesses, d..k the target's outputs (docstring)."""
    a, b, c, d, e, f, g, h, i, j, k = range(11)
    window = LookaheadWindow(level=4, window=2)
    window.reset([a, b, c])
    steps = [
        # root, expected inputs, outputs, expected n-grams, expected (rows, width) after
        (100, [a, b, c], [d, e, f], [], (2, 3)),
        (101, [b, c, d, e, f], [-1, -1, g, h, i], [], (3, 2)),
        (102, [c, e, f, h, i], [-1, -1, -1, j, k], [(102, (e, h, j)), (c, (f, i, k))], (3, 2)),
        (103, [f, h, i, j, k], [-1, -1, -1, 20, 21], [(103, (h, j, 20)), (f, (i, k, 21))], (3, 2)),
    ]
    for root, inputs, outputs, ngrams, shape in steps:
        tokens, depths, mask = window.inputs(root)
        assert tokens.tolist() == inputs
        assert mask.shape == (len(inputs), len(inputs) + 1) and len(depths) == len(inputs)
        assert window.advance(outputs) == ngrams
        assert (window.rows, window.width) == shape
    assert window.filled


# (N, W) -> [(rows, width) at steps 1, 2, ...]
FILL_SHAPES = {
    "5-7": ((5, 7), [(1, 10), (2, 9), (3, 8), (4, 7), (4, 7)]),
    "3-1": ((3, 1), [(1, 2), (2, 1), (2, 1)]),
    "3-4": ((3, 4), [(1, 5), (2, 4), (2, 4)]),
    "6-2": ((6, 2), [(1, 6), (2, 5), (3, 4), (4, 3), (5, 2), (5, 2)]),
}


@pytest.mark.parametrize("nw, shapes", FILL_SHAPES.values(), ids=list(FILL_SHAPES))
def test_window_fill_schedule(nw, shapes):
    window = LookaheadWindow(*nw)
    window.reset(list(range(window.num_guesses)))
    for step, (rows, width) in enumerate(shapes):
        assert (window.rows, window.width) == (rows, width)
        assert window.filled == (rows == nw[0] - 1)
        tokens, _, _ = window.inputs(0)
        ngrams = window.advance(np.zeros(len(tokens), dtype=np.int64))
        assert len(ngrams) == (nw[1] if rows == nw[0] - 1 else 0)


@settings(max_examples=40, deadline=None)
@given(level=st.integers(3, 7), width=st.integers(1, 8), steps=st.integers(1, 14),
       start=st.integers(0, 50))
def test_window_cells_keep_their_positions(level, width, steps, start):
    """A target whose token after position x is x + 1, guesses that name their own positions:
    every cell must hold its position ``p + l + i`` at every step (one-token steps), and every
    harvested n-gram is then N consecutive positions."""
    window = LookaheadWindow(level, width)
    window.reset([start + 1 + i for i in range(window.num_guesses)])
    for step in range(steps):
        root = start + step
        tokens, depths, _ = window.inputs(root)
        assert (tokens == root + depths).all()
        ngrams = window.advance(tokens + 1)
        assert len(ngrams) == (width if window.rows == level - 1 and step >= level - 2 else 0)
        for key, continuation in ngrams:
            assert list(continuation) == list(range(key + 1, key + level))


def test_window_rejects_bad_sizes():
    window = LookaheadWindow(4, 3)
    with pytest.raises(ValueError, match="starts with 4 guesses, got 3"):
        window.reset([1, 2, 3])
    window.reset([1, 2, 3, 4])
    with pytest.raises(ValueError, match="expected 4 lookahead outputs, got 5"):
        window.advance([0] * 5)


def test_window_inputs_are_a_copy():
    window = LookaheadWindow(3, 2)
    window.reset([5, 6])
    tokens, _, _ = window.inputs(1)
    window.advance([7, 8])
    assert tokens.tolist() == [5, 6]


# ---------------------------------------------------------------------------------------------
# The pool

# (guess, additions, key, expected candidates oldest first with counts)
POOL_CASES = {
    "docstring": (2, [(5, (1, 2)), (5, (3, 4)), (5, (1, 2)), (5, (6, 7))], 5,
                  [((1, 2), 2), ((6, 7), 1)]),
    "oldest-evicted": (2, [(5, (1,)), (5, (2,)), (5, (3,))], 5, [((2,), 1), ((3,), 1)]),
    "refresh-keeps-count": (3, [(5, (1,)), (5, (2,)), (5, (1,)), (5, (1,))], 5,
                            [((2,), 1), ((1,), 3)]),
    "keys-are-separate": (1, [(5, (1,)), (6, (2,)), (6, (3,))], 5, [((1,), 1)]),
    "other-key-bounded": (1, [(5, (1,)), (6, (2,)), (6, (3,))], 6, [((3,), 1)]),
    "unknown-key": (2, [(5, (1,))], 9, []),
    "eviction-forgets-count": (1, [(5, (1,)), (5, (1,)), (5, (2,)), (5, (1,))], 5, [((1,), 1)]),
}


@pytest.mark.parametrize("guess, additions, key, expected", POOL_CASES.values(),
                         ids=list(POOL_CASES))
def test_pool_table(guess, additions, key, expected):
    pool = LookaheadPool(guess)
    pool.add_all(additions)
    assert pool.candidates(key) == expected
    assert pool.continuations(key) == [c for c, _ in expected]


def test_pool_clear_and_len():
    pool = LookaheadPool(2)
    pool.add_all([(1, (2,)), (3, (4,))])
    assert len(pool) == 2
    pool.clear()
    assert len(pool) == 0 and pool.candidates(1) == []
    with pytest.raises(ValueError, match="guess must be >= 1"):
        LookaheadPool(0)


# ---------------------------------------------------------------------------------------------
# The drafter: the tree, its aux inputs and what observe reads

def started_drafter(level: int, window: int, guess: int, seed: int = 0) -> LookaheadDrafter:
    drafter = LookaheadDrafter(LookaheadConfig(level, window, guess))
    drafter.configure(GenerationConfig(seed=seed))
    drafter.begin(list(range(100, 140)), 0)
    return drafter


def test_drafter_window_starts_from_context_tokens_drawn_by_the_seed():
    guesses = {seed: started_drafter(5, 7, 7, seed).window.inputs(0)[0].tolist()
               for seed in (0, 0, 1)}
    assert len(guesses[0]) == 9 and all(100 <= t < 140 for t in guesses[0])
    assert started_drafter(5, 7, 7, 0).window.inputs(0)[0].tolist() == guesses[0]
    assert guesses[1] != guesses[0]


# (root, pool entries, max_depth, expected tree tokens, expected parents)
DRAFT_CASES = {
    "empty-pool-root-only": (7, [], 10, [7], [-1]),
    "root-ngrams-merged-oldest-first": (7, [(7, (1, 2)), (8, (4, 5)), (7, (1, 3)), (7, (6, 2))],
                                        10, [7, 1, 2, 3, 6, 2], [-1, 0, 1, 1, 0, 4]),
    "cut-to-max-depth": (7, [(7, (1, 2)), (7, (6, 2))], 1, [7, 1, 6], [-1, 0, 0]),
    "other-keys-ignored": (9, [(7, (1, 2))], 10, [9], [-1]),
}


@pytest.mark.parametrize("root, entries, max_depth, tokens, parents", DRAFT_CASES.values(),
                         ids=list(DRAFT_CASES))
def test_drafter_tree_and_aux_inputs(root, entries, max_depth, tokens, parents):
    drafter = started_drafter(3, 2, 3)
    drafter.pool.add_all(entries)
    tree = drafter.draft(root, np.array([0]), max_depth)
    assert (list(tree.tokens), list(tree.parents)) == (tokens, parents)
    window_tokens, depths, mask = drafter.window.inputs(root)
    assert tree.aux_tokens == tuple(window_tokens) and tree.aux_depths == tuple(depths)
    size = len(tokens)
    assert tree.aux_mask.shape == (len(window_tokens), size + len(window_tokens))
    assert tree.aux_mask[:, 0].all() and not tree.aux_mask[:, 1:size].any()  # the root only
    assert np.array_equal(tree.aux_mask[:, size:], mask[:, 1:])


def test_drafter_observe_reads_the_aux_rows():
    """observe moves the window with the aux rows' greedy tokens; tree rows are ignored."""
    drafter = started_drafter(3, 2, 2)
    drafter.pool.add(7, (1, 2))
    tree = drafter.draft(7, np.array([0]), 10)  # fill step: rows 1, width 3, 2 aux inputs
    topk = np.array([[50, 51], [52, 53], [54, 55], [60, 61], [62, 63]])
    drafter.observe(tree, TargetOutput(None, topk))
    assert (drafter.window.rows, drafter.window.width) == (2, 2)
    assert drafter.window.inputs(8)[0].tolist()[1:] == [60, 62]
    assert drafter.pool.candidates(7) == [((1, 2), 1)]  # filling: nothing harvested


# ---------------------------------------------------------------------------------------------
# Through real attention: the mask gives each lookahead input the context the window means

def one_pass_mask(rows: int, width: int, chain: int) -> torch.Tensor:
    """The pass's mask over (tree, lookahead inputs): a root-plus-``chain`` draft tree (causal),
    lookahead inputs that see the root and :func:`lookahead_mask`'s cells, never the drafts."""
    aux = lookahead_mask(rows, width)
    tree, num_aux = 1 + chain, aux.shape[0]
    mask = np.zeros((tree + num_aux, tree + num_aux), dtype=bool)
    mask[:tree, :tree] = np.tril(np.ones((tree, tree), dtype=bool))
    mask[tree:, 0] = aux[:, 0]
    mask[tree:, tree:] = aux[:, 1:]
    return torch.from_numpy(mask)


def one_pass(model, prompt: list[int], root: int, drafts: list[int], window: LookaheadWindow):
    """Prefills ``prompt``, then one forward over root + drafts + the window's inputs."""
    cache = model.new_cache(len(prompt) + 64)
    model(torch.tensor(prompt), torch.arange(len(prompt)), cache)
    cache.commit(len(prompt))
    aux, depths, _ = window.inputs(root)
    tokens = [root, *drafts, *aux.tolist()]
    positions = len(prompt) + np.concatenate([np.arange(1 + len(drafts)), depths])
    mask = one_pass_mask(window.rows, window.width, len(drafts))
    return model(torch.tensor(tokens), torch.from_numpy(positions), cache, mask)[1 + len(drafts):]


def window_context(window: LookaheadWindow, root: int, index: int) -> list[int]:
    """Lookahead input ``index``'s intended context (root first), from the grid itself."""
    grid = window.grid.copy()
    grid[0, 0] = root
    row, col = divmod(index + 1, window.width)
    return [int(grid[l, c]) for l, c in intended_context(row, col)]


def filled_window(vocab: int, level: int, width: int, seed: int) -> LookaheadWindow:
    """A window after a few steps with random outputs: filling rows, or the steady state."""
    rng = np.random.default_rng(seed)
    window = LookaheadWindow(level, width)
    window.reset(rng.integers(0, vocab, window.num_guesses).tolist())
    for _ in range(int(rng.integers(0, level + 1))):
        tokens, _, _ = window.inputs(int(rng.integers(0, vocab)))
        window.advance(rng.integers(0, vocab, len(tokens)))
    return window


@pytest.mark.parametrize("level, width, chain, seed", [(5, 7, 4, 0), (3, 3, 0, 1), (4, 2, 2, 2),
                                                       (6, 3, 1, 3)])
def test_markov_fake_reads_each_inputs_previous_token(level, width, chain, seed):
    """MarkovLM's logits depend on (previous, last) token as the real mask delivers them."""
    vocab = 11
    model = MarkovLM(vocab, seed=seed)
    window = filled_window(vocab, level, width, seed)
    prompt, root = [1, 2, 3, 4], 5
    drafts = list(range(6, 6 + chain))
    logits = one_pass(model, prompt, root, drafts, window)
    for index in range(logits.shape[0]):
        context = window_context(window, root, index)
        assert torch.equal(logits[index], model.logits_for(context[-2] if len(context) > 1
                                                           else prompt[-1], context[-1]))


@pytest.mark.parametrize("level, width, chain, seed", [(5, 7, 4, 0), (4, 3, 2, 1), (3, 2, 0, 2)])
def test_tiny_llama_reads_each_inputs_whole_context(tiny_model, level, width, chain, seed):
    """Each lookahead input's logits equal a plain forward of prompt + its intended context."""
    vocab = tiny_model.config.vocab_size
    window = filled_window(vocab, level, width, seed)
    prompt, root = [(7 * t + seed) % vocab for t in range(9)], 42
    drafts = [(3 * t + 1) % vocab for t in range(chain)]
    with torch.inference_mode():
        logits = one_pass(tiny_model, prompt, root, drafts, window)
        for index in range(logits.shape[0]):
            sequence = prompt + window_context(window, root, index)
            cache = tiny_model.new_cache(len(sequence))
            plain = tiny_model(torch.tensor(sequence), torch.arange(len(sequence)), cache)[-1]
            torch.testing.assert_close(logits[index], plain, rtol=1e-4, atol=1e-4)


def test_lookahead_is_not_replayed_from_traces():
    simulate = load_script("simulate_drafters")
    with pytest.raises(ValueError, match="cannot be replayed from a greedy trace"):
        simulate.make_drafter("lookahead", None)
