"""Lookahead decoding (Fu et al., ICML 2024): Jacobi iteration on a 2-D window feeds an n-gram
pool; pool n-grams that start with the step's root are verified in the same forward pass.

One step, ``N`` the n-gram size (level), ``W`` the window, ``G`` the verified n-grams per step:

- the **lookahead branch** (:class:`LookaheadWindow`): ``N - 1`` rows of ``W`` guessed tokens,
  row ``l`` column ``i`` at position ``p + l + i`` (``p``: the root's position; cell ``(0, 0)`` is
  the root itself). One forward pass gives the target's greedy token after every cell; the last
  row's outputs become the next newest row, and every column becomes an n-gram for the pool;
- the **n-gram pool** (:class:`LookaheadPool`): n-grams keyed by their first token, at most ``G``
  per key;
- the **verification branch**: the pool's n-grams keyed by the root, their ``N - 1`` following
  tokens hung under the root as draft chains (merged into a trie: lossless, fewer inputs).

Both branches share one forward pass: the window's cells are inputs that attend to the cached
prefix, the root and the cells :func:`lookahead_mask` allows, and are never accepted (their
K/V are dropped after the pass); the draft tree is verified as usual.

The policies, from the public code (``lade``, also Spec-Bench's copy of it), read for this
implementation:

- **Initialization**: at every generation row 0 holds ``W + N - 3`` tokens drawn uniformly, with
  replacement, from the context (here with a generator seeded by the generation's seed), after
  the root. The pool starts empty: nothing from the prompt is put in it.
- **Fill**: the first ``N - 2`` steps have fewer rows (1, 2, ... ``N - 2``) and wider ones
  (``W + N - 2``, ``W + N - 3``, ... ``W + 1``); after each, every row drops its column 0 (the
  tokens keep their positions: the root moved one ahead) and the last row's outputs, without
  column 0's, become a new row. No n-gram is harvested while filling, so (the pool being
  empty) nothing is verified either.
  (The public code runs row 0 inside the prompt's own forward pass, so its fill ends one step
  earlier; here the prefill holds the prompt alone and the first lookahead step follows it.)
- **Steady state** (``N - 1`` rows of ``W``): after each step column ``i`` gives the n-gram
  ``(row 0 .. row N-2 at column i, the target's token after row N-2's cell)``, keyed by its row-0
  token; the rows move up one (row 0 is dropped, its column 0 becomes the next root) and the last
  row's outputs are the new last row.
- **Accepted drafts do not move the window further**: whatever the accept length, the window
  moves exactly as after a one-token step, keeping its offsets from the new root (the public
  code's ``ALWAYS_FWD_ONE``, the only mode its greedy path allows).
- **Pool bound**: at most ``G`` n-grams per key; a new one evicts the key's least recently
  produced n-gram; producing an n-gram already there makes it the most recent. Reading
  candidates does not refresh them.
- **Verification**: every n-gram of the root's key, oldest first, merged into a trie under the
  root. The public code stops a fully matched n-gram at ``N - 1`` new tokens; here the target's
  token after the deepest accepted draft is carried as the next root as for every other tree, so
  a full match gives ``N`` tokens per pass.

Window cells sit up to ``W + N - 3`` positions after the root, so at the end of a generation
some lie past ``max_new_tokens`` (even past the model's context): they are guesses, never
accepted, at positions the rotary tables compute on the fly.

The window's outputs are the target's greedy tokens (``argmax``) also when sampling, as in the
public code; sampled tokens are accepted by the engine's draw-and-match walk
(:mod:`logitspec.sampling`), lossless for any deterministic proposal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .tree import DraftTree, build_tree

if TYPE_CHECKING:
    import torch

    from .acceptance import TargetOutput
    from .decoding import GenerationConfig

NGram = tuple[int, tuple[int, ...]]  # (key: the first token, the N - 1 tokens that follow it)


@dataclass(frozen=True)
class LookaheadConfig:
    """``level`` = N (n-gram size, window rows + 1), ``window`` = W (columns), ``guess`` = G
    (n-grams verified per step). Defaults: Spec-Bench's setting N=5, W=7, G=7."""

    level: int = 5
    window: int = 7
    guess: int = 7

    def __post_init__(self) -> None:
        if self.level < 3:
            raise ValueError(f"level (n-gram size N) must be >= 3, got {self.level}")
        if self.window < 1:
            raise ValueError(f"window (W) must be >= 1, got {self.window}")
        if self.guess < 1:
            raise ValueError(f"guess (G, n-grams verified per step) must be >= 1, got {self.guess}")

    @property
    def verify_capacity(self) -> int:
        """Most draft tree nodes, root included: G n-grams of N - 1 tokens, unmerged."""
        return 1 + self.guess * (self.level - 1)

    @property
    def num_window_inputs(self) -> int:
        """Most lookahead inputs of one step: ``rows * width - 1`` (the root is a tree node),
        largest over the fill steps and the steady state."""
        widest = self.window + self.level - 2
        return max(rows * (widest + 1 - rows) for rows in range(1, self.level)) - 1

    @property
    def tree_capacity(self) -> int:
        """Most inputs of one forward pass: tree nodes plus lookahead inputs (56 at 5/7/7)."""
        return self.verify_capacity + self.num_window_inputs


@lru_cache(maxsize=64)
def lookahead_mask(rows: int, width: int) -> np.ndarray:
    """(A, 1 + A) bool, A = rows * width - 1: which of (root, lookahead inputs) each lookahead
    input attends to, besides the cached prefix. Read-only (cached per shape).

    Inputs are the window's cells in row-major order, cell ``(0, 0)`` (the root) left out: cell
    ``(l, i)`` is input ``l * width + i - 1``, column ``l * width + i`` of the mask, at depth
    (position offset from the root) ``l + i``. Cell ``(l, i)`` attends to row 0's cells
    ``(0, 0) .. (0, i)`` and to its own column's cells ``(1, i) .. (l, i)``: a context of
    positions ``p .. p + l + i``, one token each, read along row 0 and then down column ``i``.

    Example, 3 rows, width 3 (N = 4, W = 3), ``r`` the root::

        row 0   r a b        a sees r a         d sees r a d       g sees r a d g
        row 1   c d e        b sees r a b       e sees r a b e     h sees r a b e h
        row 2   f g h        c sees r c         f sees r c f

    so the n-gram of column 1 is ``a d g`` plus the target's token after ``g``.
    """
    size = rows * width
    row, col = np.divmod(np.arange(size), width)
    along_row_0 = (row[None, :] == 0) & (col[None, :] <= col[:, None])
    down_column = (row[None, :] >= 1) & (row[None, :] <= row[:, None]) & (col[None, :] == col[:, None])
    mask = (along_row_0 | down_column)[1:]
    mask.flags.writeable = False
    return mask


@lru_cache(maxsize=64)
def lookahead_depths(rows: int, width: int) -> np.ndarray:
    """(A,) int64: each lookahead input's depth ``l + i`` (see :func:`lookahead_mask`)."""
    row, col = np.divmod(np.arange(rows * width), width)
    depths = (row + col)[1:]
    depths.flags.writeable = False
    return depths


class LookaheadWindow:
    """The 2-D Jacobi window of :mod:`logitspec.lookahead`: its cells, their update and the
    n-grams it yields. Cell ``(0, 0)`` is a placeholder that :meth:`inputs` fills with the root.

    Worked example, N = 4, W = 2 (widths 4, 3, then the steady 2); a step's outputs are the
    target's greedy tokens after its lookahead inputs, in input order (only the last row's are
    read)::

        reset([a, b, c])                                  row 0: r a b c
        step 1: inputs a b c,       outputs d e f   ->    row 0: . b c    row 1: d e f
        step 2: inputs b c d e f,   outputs . . g h i ->  row 0: . c      row 1: e f    row 2: h i
        step 3: inputs c e f h i,   outputs . . . j k ->  row 0: . f      row 1: h i    row 2: j k
                n-grams (r3, (e, h, j)) and (c, (f, i, k)), r3 the root of step 3

    Every cell keeps its position as the root advances: ``d`` (the token after ``a``, at
    ``p + 2`` in step 1) is cell (1, 0) at ``p2 + 1`` in step 2, whose root is at ``p2 = p + 1``.
    """

    def __init__(self, level: int, window: int) -> None:
        LookaheadConfig(level, window, 1)  # validates
        self.level = level
        self.window = window
        self.grid = np.zeros((level - 1, window + level - 2), dtype=np.int64)
        self.rows = 0
        self.width = 0

    @property
    def num_guesses(self) -> int:
        """How many tokens :meth:`reset` takes: ``W + N - 3``."""
        return self.window + self.level - 3

    @property
    def filled(self) -> bool:
        """All ``N - 1`` rows are there: the steady state, where n-grams are harvested."""
        return self.rows == self.level - 1

    def reset(self, guesses: Sequence[int]) -> None:
        """Starts over with row 0 = the root's placeholder and ``guesses`` (``num_guesses``)."""
        if len(guesses) != self.num_guesses:
            raise ValueError(f"the window starts with {self.num_guesses} guesses, got {len(guesses)}")
        self.rows, self.width = 1, self.num_guesses + 1
        self.grid[0, 1:self.width] = guesses

    def inputs(self, root: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lookahead branch under ``root``: tokens (A,), depths (A,) and the mask (A, 1 + A)
        over (root, lookahead inputs) of :func:`lookahead_mask`."""
        self.grid[0, 0] = root
        tokens = self.grid[:self.rows, :self.width].flatten()[1:]  # a copy
        return tokens, lookahead_depths(self.rows, self.width), lookahead_mask(self.rows, self.width)

    def advance(self, outputs: Sequence[int]) -> list[NGram]:
        """Moves the window after a step whose lookahead inputs gave ``outputs`` (A,); returns
        the n-grams harvested (steady state: one per column, column order; filling: none)."""
        rows, width = self.rows, self.width
        if len(outputs) != rows * width - 1:
            raise ValueError(f"expected {rows * width - 1} lookahead outputs, got {len(outputs)}")
        last = (rows - 1) * width - 1  # input index of the last row's column 0 (-1: the root)
        grid = self.grid
        if not self.filled:
            grid[:rows, :width - 1] = grid[:rows, 1:width]
            grid[rows, :width - 1] = outputs[last + 1:last + width]
            self.rows, self.width = rows + 1, width - 1
            return []
        newest = [int(t) for t in outputs[last:last + width]]
        keys = grid[0, :width].tolist()
        columns = grid[1:rows, :width].T.tolist()
        ngrams = [(key, (*column, token)) for key, column, token in zip(keys, columns, newest)]
        grid[:rows - 1, :width] = grid[1:rows, :width]
        grid[rows - 1, :width] = newest
        return ngrams


class LookaheadPool:
    """The n-gram pool: each key token's up to ``guess`` continuations (the N - 1 tokens after
    it), in the order last produced (oldest first), each with how often the window produced it
    since it entered the pool.

    Example, ``guess = 2``: adding (5, (1, 2)), (5, (3, 4)), (5, (1, 2)), (5, (6, 7)) leaves key 5
    with [((1, 2), 2), ((6, 7), 1)]: re-adding (1, 2) made it the most recent, so (3, 4), the
    least recently produced, was evicted by (6, 7).
    """

    def __init__(self, guess: int) -> None:
        if guess < 1:
            raise ValueError(f"guess must be >= 1, got {guess}")
        self.guess = guess
        self._grams: dict[int, dict[tuple[int, ...], int]] = {}

    def __len__(self) -> int:
        """How many keys have continuations."""
        return len(self._grams)

    def clear(self) -> None:
        self._grams = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        grams = self._grams.setdefault(key, {})
        count = grams.pop(continuation, 0)
        if not count and len(grams) >= self.guess:
            del grams[next(iter(grams))]
        grams[continuation] = count + 1

    def add_all(self, ngrams: Sequence[NGram]) -> None:
        for key, continuation in ngrams:
            self.add(key, continuation)

    def continuations(self, key: int) -> list[tuple[int, ...]]:
        """The key's continuations, oldest first (empty for an unknown key)."""
        grams = self._grams.get(key)
        return list(grams) if grams else []

    def candidates(self, key: int) -> list[tuple[tuple[int, ...], int]]:
        """``(continuation, times produced)`` pairs, oldest first: the scored candidate source."""
        grams = self._grams.get(key)
        return list(grams.items()) if grams else []


class LookaheadDrafter:
    """Lookahead decoding behind the :class:`~logitspec.drafters.Drafter` protocol: the
    verification branch is the draft tree, the lookahead branch its aux inputs.

    Per generation (:meth:`begin`) the pool is emptied and the window starts over from
    ``W + N - 3`` context tokens drawn with a generator seeded by the generation's seed (so a
    run is reproducible). Per step: :meth:`draft` hangs the pool's n-grams of the root under it
    (oldest first, merged, cut to ``max_depth``) and adds the window's cells as aux inputs;
    :meth:`observe` reads the target's greedy token after every aux input
    (``TargetOutput.topk[:, 0]``), moves the window and puts the harvested n-grams in the pool.
    """

    name = "lookahead"
    top_k = 1
    needs_hidden = False

    def __init__(self, config: LookaheadConfig = LookaheadConfig()) -> None:
        self.config = config
        self.tree_capacity = config.tree_capacity
        self.window = LookaheadWindow(config.level, config.window)
        self.pool = LookaheadPool(config.guess)
        self.seed = 0

    def configure(self, config: GenerationConfig) -> None:
        self.seed = config.seed

    def begin(self, context: Sequence[int], reused: int, hidden: torch.Tensor | None = None) -> None:
        """Starts the window and the pool over (the public code's per-generation state)."""
        rng = np.random.default_rng(self.seed)
        picks = rng.integers(0, len(context), size=self.window.num_guesses)
        self.window.reset([int(context[i]) for i in picks])
        self.pool.clear()

    def draft(self, root: int, root_topk: np.ndarray, max_depth: int) -> DraftTree:
        chains = self.pool.continuations(int(root))
        tree = build_tree(root, chains, self.config.verify_capacity, max_depth=max_depth)
        tokens, depths, mask = self.window.inputs(int(root))
        size, num_aux = len(tree), len(tokens)
        aux_mask = np.zeros((num_aux, size + num_aux), dtype=bool)
        aux_mask[:, 0] = mask[:, 0]
        aux_mask[:, size:] = mask[:, 1:]
        return DraftTree(tree.tokens, tree.parents, tree.depths,
                         aux_tokens=tuple(tokens.tolist()), aux_depths=tuple(depths.tolist()),
                         aux_mask=aux_mask)

    def observe(self, tree: DraftTree, out: TargetOutput) -> None:
        self.pool.add_all(self.window.advance(out.topk[len(tree):, 0]))

    def extend(self, tokens: Sequence[int], tree: DraftTree, path: Sequence[int]) -> None:
        """Nothing: the window moves one step whatever was accepted (module docstring)."""
