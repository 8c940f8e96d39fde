"""The demo's data: chatterbot-corpus' English question→answer pairs, as chat-templated training examples.

Every pair becomes one user turn and one assistant turn through the tokenizer's chat template. The loss is on the
assistant turn only: prompt tokens (system prompt, user turn, ``<|im_start|>assistant\\n``) get label ``-100``.
Pairs are split into training and held-out sets by question, so the same question never lands in both.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips


def load_chatterbot_pairs(language: str = "english") -> list[tuple[str, str]]:
    """Every (question, answer) pair of chatterbot-corpus' ``language`` YAML files, in file-name order.

    A conversation ``[s0, s1, s2, ...]`` gives the pairs ``(s0, s1), (s1, s2), ...``. Raises ``ModuleNotFoundError``
    if chatterbot-corpus is not installed.
    """
    import importlib.resources

    import yaml

    folder = importlib.resources.files("chatterbot_corpus") / "data" / language
    pairs = []
    for path in sorted(folder.iterdir(), key=lambda path: path.name):
        if not path.name.endswith(".yml"):
            continue
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in document.get("conversations", []):
            # YAML turns an answer like "42" or "yes" into an int or a bool: the corpus means the text.
            turns = [str(turn).strip() for turn in conversation]
            pairs.extend(
                (question, answer) for question, answer in zip(turns, turns[1:]) if question and answer
            )
    return pairs


def split_by_question(
    pairs: list[tuple[str, str]], held_out_size: int, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(train, held_out)``, both in corpus order, with no question in both.

    Distinct questions are visited in an order shuffled with ``seed``; each goes to ``held_out`` with all its
    pairs while that keeps ``held_out`` at most ``held_out_size`` pairs (some questions, like greetings, have
    dozens of answers). Every other pair goes to ``train``.
    """
    pairs_per_question = Counter(question for question, _ in pairs)
    if not 0 < held_out_size < len(pairs):
        raise ValueError(f"held_out_size must be between 1 and {len(pairs) - 1}, got {held_out_size}")
    questions = sorted(pairs_per_question)
    random.Random(seed).shuffle(questions)
    held_out_questions, size = set(), 0
    for question in questions:
        if size + pairs_per_question[question] <= held_out_size:
            held_out_questions.add(question)
            size += pairs_per_question[question]
        if size == held_out_size:
            break
    return (
        [pair for pair in pairs if pair[0] not in held_out_questions],
        [pair for pair in pairs if pair[0] in held_out_questions],
    )


def chat_prompt(tokenizer, question: str) -> str:
    """The chat-templated text the model sees before it answers ``question``."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def encode_pair(tokenizer, question: str, answer: str) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one exchange; ``labels`` is ``-100`` on the prompt, the ids on the answer.

    The prompt and the assistant turn are tokenized apart and concatenated, so the prompt's ids are exactly those
    ``generate`` starts from, and the label boundary never falls inside a token.
    """
    prompt = chat_prompt(tokenizer, question)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template does not render the generation prompt as a prefix of the full "
            f"exchange: {prompt!r} vs {full!r}"
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """``encode_pair`` for each pair, dropping the exchanges longer than ``max_length`` tokens (a cut answer would
    teach the model to stop mid-sentence)."""
    examples = (encode_pair(tokenizer, question, answer) for question, answer in pairs)
    return [example for example in examples if len(example["input_ids"]) <= max_length]


@dataclass
class PadToLongest:
    """Collate examples into a batch padded on the right to its longest example.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` and ``labels`` (padded with -100),
    each a ``(batch, longest)`` int64 tensor.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            input_ids[row, :length] = torch.tensor(example["input_ids"])
            attention_mask[row, :length] = 1
            labels[row, :length] = torch.tensor(example["labels"])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked out of attention and loss either way)."""
    token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad token nor an eos token to pad with")
    return token_id
