"""Trains an EAGLE-style draft head (:mod:`logitspec.draft_head`) for a target, on this machine.

    python scripts/train_draft_head.py [--model-path P] [--prompts 560] [--follow-ups 320]
        [--documents 320] [--max-new-tokens 256] [--draft-vocab 4096] [--epochs 6] [--unroll 2]
        [--work-dir DIR] [--output PATH.safetensors]

Training text, and where it comes from. No benchmark this project reports (Spec-Bench, MT-bench,
HumanEval, GSM8K, CNN/DailyMail, the demo bench) and no text of installed packages is read:
every prompt is composed by this script from its own lists (:data:`TOPICS`, :data:`TASKS`,
:data:`CODE_TASKS`, :data:`MATH_PROBLEMS`, :data:`SENTENCES`, :data:`FOLLOW_UPS`,
:data:`DOCUMENT_TASKS`), drawn with a fixed seed, and answered by the target itself:

1. first turns (``--prompts``): a task template applied to a topic ("Explain ... to a
   beginner.", "Write a short story about ..."), a programming task, an arithmetic word problem
   with drawn numbers, or a sentence to translate;
2. second turns, from the first turns' conversations (``--follow-ups``): a follow-up request
   ("Can you give a concrete example?", ...) after the target's own first answer;
3. document tasks (``--documents``): the target's own first answer, quoted as a document, with
   a request to summarize it, extract from it or answer a question about it.

The target answers greedily (HF transformers ``generate``, batched, in ``--gen-dtype``), each
prompt rendered by its chat template as the evaluation harness renders it. Then one forward
pass of the target (float32) over every conversation records its final hidden states, the
features the head reads and predicts.

Training: the head predicts the feature after each pair of the answer (pair ``j`` =
``(h_j, t_{j+1})``, predicting ``h_{j+1}``; :mod:`logitspec.draft_head`), with EAGLE's loss:
smooth-L1 regression on the feature plus 0.1 times the cross-entropy of the head's
distribution against the target's (both over the draft vocabulary). Input features get uniform
noise (``--noise``, times the features' RMS). ``--unroll K`` also trains the head on its own
predicted features, as in drafting: pass ``s`` (0 .. K-1) feeds pair ``j`` with the previous
pass's output for position ``j``, attending to exact pairs up to ``j - s``, its own earlier
predicted pairs and itself, which is exactly what a node at depth ``s + 1`` of a draft tree
sees. AdamW, linear warm-up then cosine decay, gradient norm clipped; one conversation per
forward pass, ``--batch-size`` conversations per optimizer step; a fixed seed.

Draft vocabulary: the ``--draft-vocab`` tokens most frequent in the training answers, plus the
end-of-sequence tokens; its coverage of held-out answer tokens is reported.

Size and time with the defaults for SmolLM2-135M-Instruct: 1,200 conversations (about 190,000
answer tokens to train on), 858 optimizer steps, about 44 minutes of answering and 20 of
training on a 2-core AMD EPYC; held-out top-1 agreement 53% at depth 1, 47% at depth 2.

Held out: ``--holdout`` of the conversations (drawn with the seed). Reported on them: the
head's top-1 agreement with the target's top-1 token (the argmax of the target's full LM head
at the true feature) at depth 1 (exact features in) and at each unrolled depth.

``--answers-only`` stops after the answers (their file serves as a REST datastore's corpus:
the target's own replies to prompts of no benchmark); a later run without it goes on from them.

Resumable: everything goes to ``--work-dir`` (default: beside the output): ``answers.jsonl``
(one line per answered prompt), ``features-NNNN.safetensors`` (shards of conversations, their
tokens and features), ``checkpoint.safetensors`` + ``checkpoint.json`` (the head, the optimizer
and the position in the data). A rerun with the same settings continues where it stopped.

Output: the head (safetensors) and its JSON config (target identity, draft vocabulary, shapes,
training settings and data sizes, wall times, held-out agreement), by default where
``inference_eagle`` looks for the target's head (:func:`logitspec.draft_head.default_head_path`).
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `evaluation` is importable from the repository root only
    sys.path.insert(0, str(ROOT))

from evaluation.eval_loop import RunError  # noqa: E402
from evaluation.inference_hf import load_hf_model, pad_token_id  # noqa: E402
from evaluation.prompts import PromptTemplate, resolve_template  # noqa: E402
from logitspec.draft_head import (  # noqa: E402
    DraftHead, DraftHeadConfig, default_head_path, save_draft_head, target_key,
)
from logitspec.loading import LoadedModel, ModelLoadError, load  # noqa: E402

PROG = "train_draft_head.py"
SHARD_SIZE = 64  # conversations per feature shard

# --------------------------------------------------------------------------- prompt lists

TOPICS = (
    "photosynthesis", "the water cycle", "volcanoes", "plate tectonics", "black holes",
    "the solar system", "the moon's phases", "ocean tides", "rainbows", "lightning",
    "the human heart", "sleep", "vaccines", "the immune system", "nutrition for athletes",
    "drinking enough water", "meditation", "running a first marathon", "yoga for beginners",
    "healthy breakfasts", "baking sourdough bread", "making fresh pasta", "brewing tea",
    "growing tomatoes", "composting at home", "keeping houseplants alive", "beekeeping",
    "birdwatching", "training a puppy", "caring for a cat", "aquarium fish", "honeybees",
    "the Roman Empire", "ancient Egypt", "the printing press", "the Industrial Revolution",
    "the invention of the telephone", "the history of chess", "the Silk Road", "the Vikings",
    "medieval castles", "the first moon landing", "the history of the bicycle",
    "jazz music", "learning the guitar", "classical ballet", "oil painting",
    "photography for beginners", "writing poetry", "keeping a journal", "public speaking",
    "learning a second language", "studying for exams", "time management", "remote work",
    "job interviews", "writing a resume", "starting a small business", "personal budgeting",
    "saving for retirement", "compound interest", "inflation", "how banks work",
    "supply and demand", "renewable energy", "solar panels", "wind turbines", "electric cars",
    "recycling plastic", "climate change", "deforestation", "coral reefs", "desert ecosystems",
    "rainforests", "migration of birds", "dinosaurs", "fossils", "the periodic table",
    "chemical reactions", "magnetism", "electric circuits", "the speed of light", "gravity",
    "simple machines", "bridges", "skyscrapers", "3D printing", "robots", "drones",
    "smartphones", "the internet", "email etiquette", "password security", "cloud storage",
    "databases", "spreadsheets", "open source software", "video games", "board games",
    "chess openings", "soccer", "basketball", "swimming", "hiking safety", "camping",
    "traveling on a budget", "packing for a trip", "visiting Japan", "visiting Italy",
    "city parks", "public libraries", "museums", "volunteering", "friendship",
    "moving to a new city", "planning a birthday party", "cooking rice", "knife skills",
    "coffee", "chocolate", "cheese making", "spices", "fermentation", "bicycle maintenance",
    "changing a flat tire", "home insulation", "painting a room", "woodworking",
    "knitting", "origami", "calligraphy", "astronomy with binoculars", "weather forecasts",
)
TASKS = (
    "Explain {topic} to a beginner.",
    "Explain {topic} in simple terms, as if to a ten-year-old.",
    "Write a short story about {topic}.",
    "Write a short poem about {topic}.",
    "Give me five practical tips about {topic}.",
    "List the most common mistakes people make with {topic}, and how to avoid them.",
    "What are the pros and cons of {topic}?",
    "Write a short blog post about {topic}.",
    "Describe {topic} in three paragraphs.",
    "Write a dialogue between two friends talking about {topic}.",
    "Give a step-by-step guide to getting started with {topic}.",
    "What are three surprising facts about {topic}?",
    "Write an email to a colleague that recommends reading about {topic}.",
    "Summarize what everyone should know about {topic} in five bullet points.",
    "Compare {topic} with {other}.",
    "How are {topic} and {other} related?",
    "Write a product description for a book about {topic}.",
    "Create a quiz with three questions and answers about {topic}.",
    "Write a short speech that introduces {topic} to a school class.",
    "What questions would a curious student ask about {topic}? Answer two of them.",
    "Plan a one-week learning schedule for {topic}.",
    "Write a haiku about {topic}, then explain it.",
    "Tell me the history of {topic} briefly.",
    "Why does {topic} matter in everyday life?",
    "Write a persuasive paragraph arguing that people should learn about {topic}.",
    "Define {topic} in one sentence, then expand on it.",
)
CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the vowels in a sentence", "removes duplicates from a list while keeping the order",
    "merges two sorted lists", "computes the factorial of a number", "checks whether a word is "
    "a palindrome", "finds the largest element of a list", "converts Celsius to Fahrenheit",
    "sorts a list of dictionaries by a key", "reads a text file and counts its words",
    "returns the greatest common divisor of two numbers", "flattens a nested list",
    "checks whether two words are anagrams", "computes the average of a list of numbers",
    "finds the second largest number in a list", "capitalizes the first letter of each word",
    "validates a simple email address", "converts a binary string to an integer",
    "implements binary search", "implements bubble sort", "counts word frequencies in a text",
    "returns the transpose of a matrix", "generates all subsets of a small set",
    "checks whether parentheses in a string are balanced", "rotates a list by k positions",
    "finds the intersection of two lists", "converts a number to Roman numerals",
    "returns the sum of the digits of a number",
)
CODE_LANGUAGES = ("Python", "Python", "Python", "JavaScript", "C", "Java")
CODE_TEMPLATES = (
    "Write a {language} function that {task}.",
    "Write a {language} function that {task}, and explain how it works.",
    "Show me how to write a function in {language} that {task}. Include an example call.",
)
MATH_PROBLEMS = (
    "A shop sells pencils for {a} cents each. How much do {b} pencils cost? Show your steps.",
    "A train travels at {a} km per hour for {b} hours. How far does it go? Explain.",
    "Anna has {a} apples and gives {b} of them to her friends. How many are left?",
    "A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
    "If a book has {a} pages and Tom reads {b} pages a day, how many days does he need?",
    "What is {a} multiplied by {b}? Explain the calculation step by step.",
    "A class has {a} students and {b} of them are absent. What fraction is present?",
    "A recipe needs {b} eggs for {a} cookies. How many eggs are needed for {c} cookies?",
    "Sam saves {b} dollars every week. How many weeks until he has {a} dollars?",
    "A tank holds {a} liters and {b} liters leak out each hour. How long until it is empty?",
    "What is {c} percent of {a}? Show how you compute it.",
    "The sum of two numbers is {a} and their difference is {b}. What are the numbers?",
)
SENTENCES = (
    "The library opens at nine in the morning.", "My brother likes to play the piano.",
    "We are going to the beach this weekend.", "The weather is cold but sunny today.",
    "Could you tell me where the train station is?", "I would like a cup of coffee, please.",
    "She has been learning to cook for two years.", "The museum is closed on Mondays.",
    "Our neighbors planted three trees in their garden.", "Please send me the report by Friday.",
    "The children are reading books in the park.", "I forgot my umbrella at the office.",
    "This restaurant serves the best soup in town.", "He runs five kilometers every morning.",
    "The meeting has been moved to next Tuesday.", "We watched a beautiful sunset last night.",
)
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
TRANSLATION_TEMPLATES = (
    "Translate into {language}: \"{sentence}\"",
    "How do you say \"{sentence}\" in {language}?",
    "Translate the following sentence into {language} and explain the grammar: {sentence}",
)
FOLLOW_UPS = (
    "Can you give a concrete example?", "Please make your answer shorter.",
    "Explain that again in simpler words.", "What would you add to that?",
    "Can you turn that into a numbered list?", "Now write it in a more formal tone.",
    "What is the most important point in your answer, and why?",
    "Can you rewrite that for a child?", "Give me a one-sentence summary of your answer.",
    "Are there any common misconceptions about this?", "How would an expert explain it?",
    "Write a title for your answer.",
)
DOCUMENT_TASKS = (
    "Summarize the following text in two sentences.\n\n{document}",
    "Read the text below and list its main points.\n\n{document}",
    "{document}\n\nWhat is the main idea of the text above?",
    "Here is a text:\n\n{document}\n\nWrite three questions that this text answers, with the "
    "answers.",
    "Rewrite the following text in a more formal style.\n\n{document}",
    "{document}\n\nBased only on the text above, what advice does it give?",
    "Extract the key terms from this text and explain each in a few words.\n\n{document}",
)


def first_turn(rng: random.Random) -> str:
    """One composed first-turn prompt (module docstring, step 1)."""
    kind = rng.random()
    if kind < 0.6:
        topic, other = rng.sample(TOPICS, 2)
        return rng.choice(TASKS).format(topic=topic, other=other)
    if kind < 0.75:
        return rng.choice(CODE_TEMPLATES).format(language=rng.choice(CODE_LANGUAGES),
                                                 task=rng.choice(CODE_TASKS))
    if kind < 0.9:
        a, b, c = rng.randint(12, 480), rng.randint(2, 11), rng.randint(5, 95)
        return rng.choice(MATH_PROBLEMS).format(a=a, b=b, c=c)
    return rng.choice(TRANSLATION_TEMPLATES).format(language=rng.choice(LANGUAGES),
                                                    sentence=rng.choice(SENTENCES))


Messages = list[dict[str, str]]


def first_round(count: int, seed: int) -> list[tuple[int, Messages]]:
    """``count`` single-turn conversations ``(family, messages)``, drawn with ``seed``; each
    is its own family (its index)."""
    rng = random.Random(seed)
    return [(i, [{"role": "user", "content": first_turn(rng)}]) for i in range(count)]


def second_round(answered: Sequence["Answered"], follow_ups: int, documents: int,
                 seed: int) -> list[tuple[int, Messages]]:
    """Follow-up conversations and document tasks built on answered first turns (module
    docstring, steps 2 and 3), each in the family of the first turn it builds on; first turns
    are drawn with ``seed``, each used at most once per kind."""
    rng = random.Random(seed + 1)
    usable = [a for a in answered if a.messages[-1]["content"].strip()]
    extended = [(a.family, a.messages + [{"role": "user", "content": rng.choice(FOLLOW_UPS)}])
                for a in rng.sample(usable, min(follow_ups, len(usable)))]
    docs = [(a.family, [{"role": "user", "content": rng.choice(DOCUMENT_TASKS).format(
        document=a.messages[-1]["content"])}])
        for a in rng.sample(usable, min(documents, len(usable)))]
    return extended + docs


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Answered:
    """One answered conversation: its messages (the last is the target's answer), the prompt
    ids and the answer ids (the end-of-sequence token included when one was reached);
    ``family``: the first turn it builds on (held-out splits keep families together)."""

    id: int
    family: int
    messages: Messages
    prompt_ids: list[int]
    answer_ids: list[int]


def prompt_ids(template: PromptTemplate, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt as the evaluation harness renders it (user and assistant turns, in order)."""
    conversation = template.start()
    for message in messages:
        if message["role"] == "user":
            conversation.add_user(message["content"])
        else:
            conversation.add_answer(message["content"])
    return conversation.prompt_ids()


def read_answers(path: Path) -> dict[int, Answered]:
    """The answers recorded so far (an incomplete last line, from a crash, is ignored)."""
    found: dict[int, Answered] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                item = Answered(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            found[item.id] = item
    return found


def cut_at_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


@dataclass
class Generator:
    """The target answering prompts greedily with HF ``generate``, ``batch_size`` at a time
    (left-padded); the HF model is loaded on first use. Its final normed hidden states (the
    output of ``model.norm``, the LM head's input) are captured as it runs: the prefill gives
    the prompt's, each decoding step the feature of the token it reads, so every token but
    the last answer token gets its feature with no extra forward pass."""

    loaded: LoadedModel
    template: PromptTemplate
    eos: frozenset[int]
    batch_size: int
    max_new_tokens: int
    _model: Any = None

    @torch.inference_mode()
    def answer(self, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Greedy answers (cut after the first end-of-sequence token) of ``prompts`` and the
        features (P + A - 1, H) float16 of each prompt + answer but its last token."""
        from transformers import GenerationConfig as HFGenerationConfig

        model = self._hf_model()
        pad = pad_token_id(self.loaded)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        config = HFGenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                                    eos_token_id=sorted(self.eos), pad_token_id=pad,
                                    disable_compile=True)
        captured: list[torch.Tensor] = []
        hook = model.model.norm.register_forward_hook(
            lambda module, inputs, output: captured.append(output.to(torch.float16).cpu()))
        try:
            out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=config)
        finally:
            hook.remove()
        hidden = torch.cat(captured, dim=1)  # (B, width + decoding steps, H)
        answers = [cut_at_eos(row[width:].tolist(), self.eos) for row in out]
        features = [hidden[b, width - len(p):width + len(a) - 1].clone()
                    for b, (p, a) in enumerate(zip(prompts, answers))]
        return answers, features

    def _hf_model(self) -> Any:
        if self._model is None:
            self._model = load_hf_model(self.loaded.path, torch.float32, self.loaded.model.device)
        return self._model


def shard_path(work: Path, first_id: int) -> Path:
    return work / f"features-{first_id:06d}.safetensors"


def save_shard(work: Path, ids: Sequence[int], features: Sequence[torch.Tensor]) -> None:
    """The features of one batch of conversations (written whole, then renamed)."""
    from safetensors.torch import save_file

    tensors = {"ids": torch.tensor(list(ids)), "lengths": torch.tensor([len(f) for f in features]),
               "features": torch.cat(list(features))}
    path = shard_path(work, min(ids))
    save_file(tensors, str(path.with_suffix(".tmp")))
    path.with_suffix(".tmp").replace(path)


def answer_all(generator: Generator, conversations: Sequence[tuple[int, Messages]],
               first_id: int, work: Path) -> list[Answered]:
    """Answers every conversation (ids ``first_id ..``) not answered yet in ``work``, in
    batches of similar prompt length; each batch's features go to a shard, then its answers
    to ``answers.jsonl``."""
    from tqdm import tqdm

    path = work / "answers.jsonl"
    done = read_answers(path)
    template = generator.template
    todo = [(first_id + i, family, messages, prompt_ids(template, messages))
            for i, (family, messages) in enumerate(conversations) if first_id + i not in done]
    todo.sort(key=lambda item: len(item[3]))
    size = generator.batch_size
    with open(path, "a") as out, tqdm(total=len(todo), desc="answering", unit="prompt") as bar:
        for batch in (todo[i:i + size] for i in range(0, len(todo), size)):
            answers, features = generator.answer([prompt for *_, prompt in batch])
            save_shard(work, [item[0] for item in batch], features)
            for (item_id, family, messages, prompt), answer in zip(batch, answers):
                text = template.start().answer_text(answer)
                item = Answered(item_id, family,
                                messages + [{"role": "assistant", "content": text}], prompt, answer)
                done[item_id] = item
                out.write(json.dumps(asdict(item)) + "\n")
            out.flush()
            bar.update(len(batch))
    return [done[first_id + i] for i in range(len(conversations))]


# --------------------------------------------------------------------------- features


@dataclass
class Conversation:
    """One conversation as the head trains on it: its tokens (L,), the target's features of
    all but the last (L - 1, H), and where the answer starts (its first token's index)."""

    tokens: torch.Tensor
    features: torch.Tensor
    answer_start: int

    @property
    def pairs(self) -> int:
        """Pairs ``(h_j, t_{j+1})`` with a known next feature: j = 0 .. pairs - 1."""
        return len(self.features) - 1


def load_conversations(work: Path, items: Sequence[Answered]) -> list[Conversation]:
    """``items`` with their features, read from the shards in ``work``."""
    from safetensors.torch import load_file

    features: dict[int, torch.Tensor] = {}
    for path in sorted(work.glob("features-*.safetensors")):
        shard = load_file(str(path))
        rows = torch.split(shard["features"], shard["lengths"].tolist())
        features.update(zip(shard["ids"].tolist(), rows))
    missing = [item.id for item in items if item.id not in features]
    if missing:
        raise RunError(f"{work} has no features for {len(missing)} answered conversations "
                       f"(e.g. id {missing[0]}): pass another --work-dir")
    return [Conversation(torch.tensor(item.prompt_ids + item.answer_ids), features[item.id],
                         len(item.prompt_ids)) for item in items]


def draft_vocabulary(sequences: Sequence[Conversation], size: int, eos: Sequence[int]) -> list[int]:
    """The ``size`` token ids most frequent among the answers (ties: the smaller id), plus the
    end-of-sequence ids."""
    counts: Counter = Counter()
    for seq in sequences:
        counts.update(seq.tokens[seq.answer_start:].tolist())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return sorted({t for t, _ in ranked[:size]} | set(eos))


def coverage(sequences: Sequence[Conversation], vocab: Sequence[int]) -> float:
    """The fraction of answer tokens that are in ``vocab``."""
    allowed = set(vocab)
    answer = [t for s in sequences for t in s.tokens[s.answer_start:].tolist()]
    return sum(t in allowed for t in answer) / max(len(answer), 1)


# --------------------------------------------------------------------------- training


def root_pair(seq: Conversation) -> int:
    """The first trained pair: ``(h_{P-1}, t_P)``, the last prompt feature and the first
    answer token (a draft step's root), P = the answer's start."""
    return max(seq.answer_start - 1, 0)


def pass_size(seq: Conversation, step: int) -> int:
    """Rows of pass ``step``: every pair for the exact pass 0; for pass s >= 1 the pairs
    ``j >= root + s`` (the others are never trained and nothing trained reads them)."""
    return seq.pairs if step == 0 else max(seq.pairs - root_pair(seq) - step, 0)


def unroll_mask(n: int, root: int, step: int) -> torch.Tensor:
    """What pass ``step`` sees: its row ``i`` (pair ``j = root + step + i``) sees the exact
    pairs up to ``j - step`` (pass 0's first ``root + i + 1`` rows), row ``i`` of every pass
    ``1 .. step - 1`` (its ancestors in a draft tree) and itself; pass 0 is causal.

    Example, n = 4 pairs, root 1, step 1: rows [1 1 0 0 | 1 0] and [1 1 1 0 | 0 1].
    """
    if step == 0:
        return torch.ones(n, n, dtype=torch.bool).tril_()
    i = torch.arange(n - root - step)[:, None]
    blocks = [torch.arange(n)[None, :] <= root + i]
    blocks += [torch.arange(n - root - r)[None, :] == i for r in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


class GrowingCache:
    """The head's keys and values during training, as a :class:`~logitspec.kv_cache.KVCache`
    holds them for decoding, but concatenated out of place: later passes never modify what
    autograd saved for earlier ones."""

    def __init__(self) -> None:
        self.length = 0
        self._stored: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin(self, num_new: int) -> None:
        self._pending = None

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``keys``, ``values`` (H_kv, T, D) after the stored ones: (H_kv, length + T, D)."""
        if self._stored is not None:
            keys = torch.cat((self._stored[0], keys), dim=1)
            values = torch.cat((self._stored[1], values), dim=1)
        self._pending = (keys, values)
        return keys, values

    def commit(self, num_tokens: int) -> None:
        self._stored = self._pending
        self.length += num_tokens


def trained_predictions(head: DraftHead, seq: Conversation, steps: int, noise: float,
                        generator: torch.Generator | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pass (module docstring): the head's predicted features at its trained rows and
    the true next features there (both (m, H)). Pass ``s`` feeds pair ``j`` with pass
    ``s - 1``'s output for pair ``j - 1``, the predicted ``h_j``."""
    n, root = seq.pairs, root_pair(seq)
    features = seq.features.to(head.fc.weight.dtype)
    inputs = features[:n]
    if noise and generator is not None:
        inputs = inputs + (torch.rand(inputs.shape, generator=generator) * 2 - 1) * noise
    cache = GrowingCache()
    result = []
    for step in range(steps):
        first = 0 if step == 0 else root + step
        if first >= n:
            break
        out = head(inputs, seq.tokens[first + 1:n + 1], torch.arange(first, n), cache,
                   unroll_mask(n, root, step))
        cache.commit(n - first)
        keep = root if step == 0 else 0
        result.append((out[keep:], features[first + keep + 1:n + 1]))
        inputs = out[root:n - 1] if step == 0 else out[:-1]
    return result


def row_count(seq: Conversation, steps: int) -> int:
    """Trained rows over ``steps`` passes."""
    return sum(max(seq.pairs - root_pair(seq) - s, 0) for s in range(steps))


def sequence_loss(head: DraftHead, seq: Conversation, args: argparse.Namespace,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The summed loss over the trained rows of every pass: smooth-L1 on the predicted
    feature (mean over its entries) + ``cls_weight`` x cross-entropy against the target's
    distribution over the draft vocabulary (the softmax of its LM head rows at the true
    feature)."""
    total = seq.features.new_zeros((), dtype=torch.float32)
    for predicted, target in trained_predictions(head, seq, args.unroll, args.noise_abs, generator):
        target = target.float()
        with torch.no_grad():
            teacher = torch.softmax(head.logits(target), dim=-1)
        regression = F.smooth_l1_loss(predicted, target, reduction="none").mean(-1)
        cross_entropy = -(teacher * torch.log_softmax(head.logits(predicted), dim=-1)).sum(-1)
        total = total + (regression + args.cls_weight * cross_entropy).sum()
    return total


def learning_rate(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to a tenth of ``lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(total - args.warmup, 1)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class Progress:
    """Where training is: the epoch, the optimizer steps done in it and in all."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


def checkpoint_paths(work: Path) -> tuple[Path, Path]:
    return work / "checkpoint.safetensors", work / "checkpoint.json"


def save_checkpoint(work: Path, head: DraftHead, optimizer: torch.optim.Optimizer,
                    progress: Progress, settings: dict[str, Any]) -> None:
    """The head's and the optimizer's tensors (safetensors) and the progress (JSON)."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"opt.{index}.{name}"] = value.detach().reshape(-1).contiguous() \
                if value.dim() == 0 else value.detach().contiguous()
    weights, meta = checkpoint_paths(work)
    save_file(tensors, str(weights.with_suffix(".tmp")))
    weights.with_suffix(".tmp").replace(weights)
    meta.write_text(json.dumps({"progress": asdict(progress), "settings": settings}))


def load_checkpoint(work: Path, head: DraftHead, optimizer: torch.optim.Optimizer,
                    settings: dict[str, Any]) -> Progress:
    """Restores a checkpoint written with the same settings (none: a fresh start)."""
    from safetensors.torch import load_file

    weights, meta = checkpoint_paths(work)
    if not (weights.is_file() and meta.is_file()):
        return Progress()
    saved = json.loads(meta.read_text())
    if saved["settings"] != settings:
        raise RunError(f"{work} holds a checkpoint trained with other settings: pass another "
                       "--work-dir or delete its checkpoint files")
    tensors = load_file(str(weights))
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})
    return Progress(**saved["progress"])


def train(head: DraftHead, sequences: Sequence[Conversation], args: argparse.Namespace,
          work: Path, settings: dict[str, Any]) -> Progress:
    """AdamW over ``sequences``, ``batch_size`` conversations per step, shuffled per epoch
    with the seed; checkpoints every ``checkpoint_every`` steps and at the end."""
    from tqdm import tqdm

    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    progress = load_checkpoint(work, head, optimizer, settings)
    per_epoch = math.ceil(len(sequences) / args.batch_size)
    total = per_epoch * args.epochs
    with tqdm(total=total, initial=progress.step, desc="training", unit="step") as bar:
        while progress.epoch < args.epochs:
            order = list(range(len(sequences)))
            random.Random(args.seed + progress.epoch).shuffle(order)
            for index in range(progress.step_in_epoch, per_epoch):
                batch = [sequences[i] for i in order[index * args.batch_size:(index + 1) * args.batch_size]]
                loss = train_step(head, optimizer, params, batch, args, learning_rate(progress.step, total, args),
                                  torch.Generator().manual_seed(args.seed * 1_000_003 + progress.step))
                progress.step += 1
                progress.step_in_epoch = index + 1
                bar.set_postfix(loss=f"{loss:.3f}")
                bar.update(1)
                if progress.step % args.checkpoint_every == 0:
                    save_checkpoint(work, head, optimizer, progress, settings)
            progress.epoch += 1
            progress.step_in_epoch = 0
    save_checkpoint(work, head, optimizer, progress, settings)
    return progress


def train_step(head: DraftHead, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
               batch: Sequence[Conversation], args: argparse.Namespace, lr: float,
               generator: torch.Generator) -> float:
    """One optimizer step over ``batch``; returns the mean loss per trained row."""
    rows = sum(row_count(seq, args.unroll) for seq in batch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad()
    total = 0.0
    for seq in batch:
        loss = sequence_loss(head, seq, args, generator) / max(rows, 1)
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(params, args.clip)
    optimizer.step()
    return total


@torch.no_grad()
def agreement(head: DraftHead, sequences: Sequence[Conversation], lm_head: torch.Tensor,
              steps: int) -> list[float | None]:
    """Per depth (pass + 1): the fraction of trained rows where the head's top token equals
    the target's top-1 token at that position (the argmax of its full LM head ``lm_head``
    (V, H) at the true feature)."""
    hits, counts = [0] * steps, [0] * steps
    for seq in sequences:
        for step, (predicted, target) in enumerate(trained_predictions(head, seq, steps, 0.0, None)):
            mine = head.draft_ids[head.logits(predicted).argmax(-1)]
            hits[step] += int((mine == (target.float() @ lm_head.T).argmax(-1)).sum())
            counts[step] += len(target)
    return [round(h / c, 4) if c else None for h, c in zip(hits, counts)]


# --------------------------------------------------------------------------- the run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--model-path", default=None, help="the target (default: the embedded model)")
    add("--output", default=None, help="the head (.safetensors; default: the target's head "
        "under the model cache, where inference_eagle finds it)")
    add("--work-dir", default=None, help="data and checkpoints (default: 'work' beside the output)")
    add("--prompts", type=int, default=560, help="first-turn prompts")
    add("--follow-ups", type=int, default=320, help="second turns after first answers")
    add("--documents", type=int, default=320, help="tasks over first answers quoted as documents")
    add("--max-new-tokens", type=int, default=256, help="longest answer")
    add("--gen-batch", type=int, default=32, help="prompts per generate call")
    add("--draft-vocab", type=int, default=4096, help="draft vocabulary size")
    add("--holdout", type=float, default=0.05, help="fraction of conversation families held out")
    add("--epochs", type=int, default=6)
    add("--batch-size", type=int, default=8, help="conversations per optimizer step")
    add("--lr", type=float, default=1e-3)
    add("--warmup", type=int, default=40, help="warm-up steps")
    add("--clip", type=float, default=1.0, help="gradient norm clip")
    add("--unroll", type=int, default=2, help="passes over the head's own predictions (1: none)")
    add("--noise", type=float, default=0.1,
        help="uniform noise on input features, in units of their RMS")
    add("--cls-weight", type=float, default=0.1, help="weight of the cross-entropy term")
    add("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    add("--answers-only", action="store_true",
        help="stop after answering: the answers file alone (for instance a REST datastore's "
             "corpus: scripts/build_rest_datastore.py WORK_DIR/answers.jsonl)")
    add("--device", default="cpu")
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output is not None and not args.output.endswith(".safetensors"):
        parser.error("--output must end with .safetensors")
    counts = (args.prompts, args.max_new_tokens, args.draft_vocab, args.epochs, args.batch_size,
              args.unroll, args.gen_batch, args.warmup, args.checkpoint_every)
    if min(counts) < 1 or min(args.follow_ups, args.documents) < 0:
        parser.error("counts must be >= 1 (--follow-ups and --documents >= 0)")
    if not 0 < args.holdout < 1 or args.lr <= 0 or args.noise < 0 or args.cls_weight < 0:
        parser.error("--holdout must be in (0, 1); --lr > 0; --noise, --cls-weight >= 0")
    return args


DATA_FLAGS = ("prompts", "follow_ups", "documents", "max_new_tokens", "seed")
TRAIN_FLAGS = ("draft_vocab", "holdout", "epochs", "batch_size", "lr", "warmup", "clip",
               "unroll", "noise", "cls_weight")


def check_work_dir(work: Path, key: str, args: argparse.Namespace) -> None:
    """Claims ``work`` for this target and these data settings; a folder made with others is
    refused (its answers would not be these)."""
    settings = {"target": key, **{f: getattr(args, f) for f in DATA_FLAGS}}
    path = work / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise RunError(f"{work} holds data made with other settings ({path}): pass another "
                       "--work-dir")
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


class Timer:
    """Wall and CPU seconds (this process, all its threads) per phase, added over every run
    on the same work folder. On a machine shared with other jobs the wall time grows with
    their load; the CPU time is about what a quiet machine needs with the same threads."""

    def __init__(self, work: Path) -> None:
        self.path = work / "timings.json"
        self.seconds: dict[str, dict[str, float]] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {})
        self._start = (0.0, 0.0)

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def add(self, phase: str) -> None:
        wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
        done = self.seconds.setdefault(phase, {"wall": 0.0, "cpu": 0.0})
        done["wall"] = round(done["wall"] + wall, 1)
        done["cpu"] = round(done["cpu"] + cpu, 1)
        self.path.write_text(json.dumps(self.seconds, indent=1) + "\n")


def build_data(generator: Generator, args: argparse.Namespace, work: Path) -> list[Answered]:
    """Every conversation, answered (module docstring: first turns, then second turns)."""
    first = answer_all(generator, first_round(args.prompts, args.seed), 0, work)
    second = second_round(first, args.follow_ups, args.documents, args.seed)
    return first + answer_all(generator, second, len(first), work)


def split(items: Sequence[Answered], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out conversations: whole families (a first turn and
    what was built on it) are held out, ``fraction`` of them, drawn with ``seed``."""
    families = sorted({item.family for item in items})
    random.Random(seed + 2).shuffle(families)
    held = set(families[: max(1, round(fraction * len(families)))])
    train = [i for i, item in enumerate(items) if item.family not in held]
    return train, [i for i, item in enumerate(items) if item.family in held]


def feature_rms(sequences: Sequence[Conversation]) -> float:
    squares = sum(float(s.features.float().pow(2).sum()) for s in sequences)
    return math.sqrt(squares / max(sum(s.features.numel() for s in sequences), 1))


def data_sizes(items: Sequence[Answered], train: Sequence[int], held: Sequence[int]) -> dict[str, int]:
    def tokens(indices: Sequence[int], field: str) -> int:
        return sum(len(getattr(items[i], field)) for i in indices)

    return {"conversations": len(items), "train_conversations": len(train),
            "heldout_conversations": len(held), "train_answer_tokens": tokens(train, "answer_ids"),
            "train_prompt_tokens": tokens(train, "prompt_ids"),
            "heldout_answer_tokens": tokens(held, "answer_ids")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        loaded = load(args.model_path, dtype="float32", device=args.device)
    except (ModelLoadError, ValueError) as exc:
        raise RunError(str(exc)) from None
    model = loaded.model
    key = target_key(model, loaded.name)
    output = Path(args.output) if args.output else default_head_path(model, loaded.name)
    work = Path(args.work_dir) if args.work_dir else output.parent / "work"
    check_work_dir(work, key, args)
    timer = Timer(work)
    template = resolve_template(loaded.tokenizer, loaded.name, None)
    eos = frozenset(loaded.eos_token_ids + template.stop_token_ids)
    timer.start()
    items = build_data(Generator(loaded, template, eos, args.gen_batch, args.max_new_tokens),
                       args, work)
    timer.add("answering")
    if args.answers_only:
        return {"answers": str(work / "answers.jsonl"), "conversations": len(items),
                "answer_tokens": sum(len(item.answer_ids) for item in items),
                "seconds": {**timer.seconds,
                            "this_run_wall": round(time.perf_counter() - started, 1)}}
    sequences = load_conversations(work, items)
    train_ids, held_ids = split(items, args.holdout, args.seed)
    train_set = [sequences[i] for i in train_ids]
    held_set = [sequences[i] for i in held_ids]
    vocab = draft_vocabulary(train_set, args.draft_vocab, sorted(eos))
    args.noise_abs = args.noise * feature_rms(train_set)
    torch.manual_seed(args.seed)
    head = DraftHead(DraftHeadConfig.for_target(model.config, vocab)).attach(model)
    settings = {"vocab": vocab, **{f: getattr(args, f) for f in TRAIN_FLAGS}}
    timer.start()
    progress = train(head, train_set, args, work, settings)
    timer.add("training")
    timer.start()
    head.eval()
    report = {
        "heldout_top1_agreement": agreement(head, held_set, model.lm_head.weight, args.unroll),
        "heldout_vocab_coverage": round(coverage(held_set, vocab), 4),
        "train_vocab_coverage": round(coverage(train_set, vocab), 4),
    }
    timer.add("evaluation")
    info = {
        "target": {"name": loaded.name, "key": key, "path": str(loaded.path)},
        "data": {"source": "prompts composed by scripts/train_draft_head.py (topic, task, code, "
                           "arithmetic and translation lists; follow-ups and document tasks "
                           "over the target's own answers), answered greedily by the target",
                 **{f: getattr(args, f) for f in DATA_FLAGS},
                 **data_sizes(items, train_ids, held_ids)},
        "training": {**{f: getattr(args, f) for f in TRAIN_FLAGS}, "steps": progress.step,
                     "noise_abs": round(args.noise_abs, 6), "seed": args.seed,
                     "trainable_parameters": sum(p.numel() for p in head.parameters()),
                     "threads": torch.get_num_threads(), "torch": torch.__version__},
        "seconds": {**timer.seconds, "this_run_wall": round(time.perf_counter() - started, 1)},
        "report": report,
    }
    save_draft_head(head, output, info)
    return {"output": str(output), "work_dir": str(work), **info}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except RunError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.answers_only:
        print(f"{summary['conversations']} conversations, {summary['answer_tokens']} answer "
              f"tokens in {summary['answers']}")
        print(json.dumps(summary))
        return 0
    report = summary["report"]
    print(f"held-out top-1 agreement per depth: {report['heldout_top1_agreement']}; draft "
          f"vocabulary covers {report['heldout_vocab_coverage']:.1%} of held-out answer tokens")
    print(f"saved {summary['output']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
