"""The second offline demo's assets: a tiny chat policy and addition problems whose answer is checkable.

`lightning_ppo.tiny` builds them once into its cache, as `tiny:chat-policy` and `tiny:arithmetic`:

- `tiny:arithmetic`: a `DatasetDict` of "What is 23 + 58?" problems, "train" and "test", columns `prompt`
  (a list of chat messages) and `answer` (the sum as a string). No unordered pair {a, b} of the test
  split is in train, so a held-out accuracy measures addition, not recall;
- `tiny:chat-policy`: a 2-layer GPT-2 with a chat template, fine-tuned (SFT) on the train problems just
  long enough to answer some of them: a warm start that RL can improve, as chat models are.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<s>", "<|im_end|>", "<unk>"
TURN_TOKEN = "<|im_start|>"
# ChatML turns; the BOS comes from the template only: apply_chat_template encodes without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_OPERAND = 99  # problems a + b with 0 <= a, b <= MAX_OPERAND: 10,000 of them
TEST_PAIR_FRACTION = 0.1  # of the unordered pairs {a, b}, held out with both orders
MAX_POSITIONS = 64
# SFT until a sampled answer (temperature 1) to a training problem is right 30% of the time
SFT_TARGET_ACCURACY = 0.3
SFT_MAX_STEPS = 2000
SFT_LR = 3e-3
SFT_WIDTH = 64
SFT_BATCH_SIZE = 64
SFT_CHECK_EVERY = 25  # steps between accuracy checks, on the first SFT_PROBE_ROWS training problems
SFT_PROBE_ROWS = 512


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def make_problems(rng: random.Random) -> dict[str, dict[str, list]]:
    """Every a + b, split by unordered pair: {a, b} is wholly in "train" or wholly in "test"."""
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(a, MAX_OPERAND + 1)]
    rng.shuffle(pairs)
    num_test = round(TEST_PAIR_FRACTION * len(pairs))
    splits = {"test": pairs[:num_test], "train": pairs[num_test:]}
    problems = {}
    for name, split_pairs in splits.items():
        ordered = sorted({order for a, b in split_pairs for order in ((a, b), (b, a))})
        rng.shuffle(ordered)
        problems[name] = {
            "prompt": [[{"role": "user", "content": question(a, b)}] for a, b in ordered],
            "answer": [str(a + b) for a, b in ordered],
        }
    return problems


def make_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one token per digit, ChatML turn tokens and a chat template.

    Text is pre-tokenized as GPT-2's byte-level BPE (`Ġ` marks a space) so decoding is exact; EOS is the
    turn's end, so a sampled answer stops there. Like Llama's, it adds BOS when it encodes a plain text.
    """
    pieces = ["user", "assistant", "system", "Ċ", "Ġ", "What", "Ġis", "Ġ+", "?", *"0123456789"]
    specials = [BOS_TOKEN, EOS_TOKEN, TURN_TOKEN, UNK_TOKEN]
    vocab = {token: i for i, token in enumerate([*specials, *pieces])}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[TURN_TOKEN],
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_prompt_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> list[int]:
    """The messages rendered by the chat template, ready for the assistant's turn; one BOS, the template's."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def sft_examples(
    tokenizer: PreTrainedTokenizerFast, problems: dict[str, list]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + answer + EOS as right-padded ids (N, T), and the mask of the answer tokens (N, T)."""
    rows, masks = [], []
    for messages, answer in zip(problems["prompt"], problems["answer"], strict=True):
        prompt = chat_prompt_ids(tokenizer, messages)
        response = [*tokenizer(answer, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(prompt + response)
        masks.append([0] * len(prompt) + [1] * len(response))
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.eos_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, row_mask) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), torch.tensor(row_mask, dtype=torch.bool)
    return ids, mask


def train_chat_policy(
    tokenizer: PreTrainedTokenizerFast,
    train: dict[str, list],
    target_accuracy: float = SFT_TARGET_ACCURACY,
    max_steps: int = SFT_MAX_STEPS,
) -> GPT2LMHeadModel:
    """A tiny GPT-2 fine-tuned on the answers (the loss masks the prompt) until a sampled answer is right
    `target_accuracy` of the time: a stop on accuracy, not on a step count, because accuracy jumps
    within a hundred steps at a point that moves with the seed."""
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=SFT_WIDTH, n_positions=MAX_POSITIONS, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    ids, answer_mask = sft_examples(tokenizer, train)  # (N, T) each
    probe_ids, probe_mask = ids[:SFT_PROBE_ROWS], answer_mask[:SFT_PROBE_ROWS]
    optimizer = torch.optim.Adam(model.parameters(), lr=SFT_LR)
    for step in range(1, max_steps + 1):
        rows = torch.randint(0, len(ids), (SFT_BATCH_SIZE,))
        token_logprobs = answer_logprobs(model.train(), ids[rows], answer_mask[rows])  # (B, T - 1)
        loss = -token_logprobs.sum() / answer_mask[rows].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % SFT_CHECK_EVERY == 0:
            with torch.no_grad():
                accuracy = answer_logprobs(model.eval(), probe_ids, probe_mask).sum(-1).exp().mean().item()
            logger.info("tiny chat policy step %d: answer loss %.3f, accuracy %.3f", step, loss, accuracy)
            if accuracy >= target_accuracy:
                return model.eval()
    raise RuntimeError(  # a broken recipe, not a user mistake: fail the build loudly
        f"the tiny chat policy did not reach {target_accuracy} accuracy in {max_steps} SFT steps"
    )


def answer_logprobs(model: GPT2LMHeadModel, ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """log p(token) of each answer token given the ones before, 0 elsewhere. (B, T) -> (B, T - 1)

    The sum over a row, exponentiated, is the probability that sampling at temperature 1 gives that answer.
    """
    logits = model(input_ids=ids).logits[:, :-1]  # (B, T - 1, V)
    logprobs = torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
    return logprobs * answer_mask[:, 1:]


def build_arithmetic_assets(root: Path, seed: int = 0) -> None:
    """Write `arithmetic/` and `chat-policy/` under `root`, deterministically for a seed."""
    problems = make_problems(random.Random(seed))
    DatasetDict({name: Dataset.from_dict(split) for name, split in problems.items()}).save_to_disk(
        root / "arithmetic"
    )
    threads = torch.get_num_threads()
    # One thread: on 2 cores shared by other jobs, two threads made these small steps 9x slower (measured).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's torch seed is left as it was
            torch.manual_seed(seed)
            tokenizer = make_chat_tokenizer()
            policy = train_chat_policy(tokenizer, problems["train"])
    finally:
        torch.set_num_threads(threads)
    policy.save_pretrained(root / "chat-policy")
    tokenizer.save_pretrained(root / "chat-policy")
