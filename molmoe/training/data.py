"""Fine-tuning data: the JSONL format (docs/training.md, "Data format"), its scan, the
preprocessed examples, padded batches and a deterministic, length-bucketed batch order.

One example is laid out as Molmo was trained (spec §5.2, the released data formatter):

    [BOS] <image tokens> " User: q1 Assistant:" " a1" <EOS> " User: q2 Assistant:" " a2" <EOS> ...

The first prompt is what the exact `Processor` returns for (q1, image): BOS, the image tokens and
`prompt_text(q1)`. Everything after it is encoded piece by piece with `Tokenizer.encode_text`, so a
special string typed in the data ("<|endoftext|>", "<im_patch>") is text, never a special id. The
loss mask is True exactly on each answer's tokens and the EOS that ends it; `training_loss`
predicts token i from position i - 1, so those are the tokens the model learns to produce.

`TrainingData` checks every line when it is built (JSON, schema, image decodes, point grammar,
length), so a long run cannot die on a bad record hours in. `BucketSampler` and `rank_batches`
give every rank its share of each global batch as a pure function of (seed, step): a resumed run
asks for step N and gets what the first run got.

Legend: B batch, S padded length, T crops (max over the batch), P patches per crop, F patch
features, Q pooled tokens per crop.
"""
from __future__ import annotations

import codecs
import itertools
import json
import os
import pathlib
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data

from molmoe.errors import MolmoeError, UsageError, is_integral
from molmoe.fileio import json_type, regular_file
from molmoe.generation.batching import PAD, pad_crops
from molmoe.points import PointsFormatError, check_points
from molmoe.processing.images import ImageError, load_image
from molmoe.processing.processor import prompt_text

# Why a record was skipped (TrainingData.skipped), in the order report() lists them.
SKIP_REASONS = ("bad json", "bad record", "missing image", "unreadable image", "malformed points",
                "too long")
RECORD_KEYS = ("image", "messages")
MESSAGE_KEYS = ("role", "content")
_NO_LIMIT = sys.maxsize  # the processor's own length check is replaced by the scan's
_SCAN_CHUNK = 256  # lines handed to the scan threads at a time, per thread


class DataError(MolmoeError):
    """A bad training file or record. The message starts with "<file>:<line>: " (or "<file>: "
    for the file as a whole); `reason` is one of SKIP_REASONS for a record."""

    def __init__(self, message: str, *, reason: str | None = None, source: str | None = None):
        super().__init__(message)
        self.reason, self.source = reason, source


def _kind(value) -> str:
    """The JSON type of a parsed value, in words."""
    return "an object" if isinstance(value, dict) else json_type(value)


class _Bad(Exception):
    """A record's problem, before the scan adds where it is."""

    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One validated line of the file."""
    source: str  # "path/to/train.jsonl:12"
    image: pathlib.Path | None  # absolute, or None for a text-only record
    turns: tuple[tuple[str, str], ...]  # (user, assistant)
    length: int  # tokens of the full example
    answer_tokens: int  # tokens the loss mask marks (answers + their EOS)


@dataclass
class Example:
    """One preprocessed record."""
    input_ids: torch.Tensor  # (S,) int64
    loss_mask: torch.Tensor  # (S,) bool, True on answer tokens and their EOS
    images: torch.Tensor | None  # (T, P, F) float32
    image_masks: torch.Tensor | None  # (T, P); None when the settings have no padding mask
    image_input_idx: torch.Tensor | None  # (T, Q) int32, positions in input_ids
    source: str


# ----------------------------------------------------------------------------- records


def _turns(obj: dict) -> tuple[tuple[str, str], ...]:
    """The (user, assistant) pairs of a record's "messages", or _Bad("bad record")."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "it is missing" if messages is None else f"got {_kind(messages)} {messages!r}"
        raise _Bad("bad record", f"'messages' must be a non-empty list of "
                                 f"{{'role', 'content'}} objects; {got[:80]}")
    if len(messages) % 2:
        raise _Bad("bad record", f"'messages' has {len(messages)} entries; it must alternate "
                                 "user, assistant and end with an assistant answer")
    texts = []
    for k, msg in enumerate(messages):
        role = "user" if k % 2 == 0 else "assistant"
        if not isinstance(msg, dict):
            raise _Bad("bad record", f"message {k + 1} must be an object, got {_kind(msg)}")
        unknown = sorted(set(msg) - set(MESSAGE_KEYS))
        if unknown:
            raise _Bad("bad record", f"message {k + 1}: unknown key {unknown[0]!r} (a message "
                                     "has 'role' and 'content')")
        if msg.get("role") != role:
            raise _Bad("bad record", f"message {k + 1} must have role {role!r}, got "
                                     f"{msg.get('role')!r} (roles alternate user, assistant, "
                                     "starting with user)")
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            got = _kind(content) if not isinstance(content, str) else repr(content)
            raise _Bad("bad record", f"message {k + 1} ({role}): 'content' must be a non-empty "
                                     f"string, got {got}")
        texts.append(content)
    return tuple(zip(texts[0::2], texts[1::2]))


def _continuation(tokenizer, turns) -> list[tuple[list[int], bool]]:
    """The pieces after the first prompt, each (ids, is_answer): " a1" EOS, " User: q2
    Assistant:", " a2" EOS, ... Every message after the first starts with a space (spec §5.2)."""
    pieces = []
    for k, (user, answer) in enumerate(turns):
        if k:
            pieces.append((tokenizer.encode_text(prompt_text(user)), False))
        pieces.append((tokenizer.encode_text(" " + answer) + [tokenizer.eos_token_id], True))
    return pieces


class TrainingData(torch.utils.data.Dataset):
    """A JSONL fine-tuning file, every line checked now; `dataset[i]` runs the processor.

    max_length: the longest example allowed, image tokens included (default: the processor's
    max_positions, the model's position limit; None there = no limit).
    skip_bad: skip bad records, counted per reason in `skipped`, instead of raising DataError.
    workers: threads for the scan (image decoding and tokenising release the GIL); 0 = none.
    """

    def __init__(self, path, processor, *, max_length: int | None = None,
                 skip_bad: bool = False, workers: int = 0):
        self.path = pathlib.Path(path)
        self.name = os.fspath(path)
        self.processor = processor
        self.max_length = processor.max_positions if max_length is None else max_length
        if self.max_length is not None and (not is_integral(self.max_length)
                                            or self.max_length < 1):
            raise UsageError(f"max_length must be a positive int, got {self.max_length!r}")
        if not is_integral(workers) or workers < 0:
            raise UsageError(f"workers must be an int >= 0, got {workers!r}")
        self.skip_bad = skip_bad
        self.records: list[Record] = []
        self.skipped: dict[str, int] = {}
        self.first_skip: str | None = None
        self._sizes: dict[pathlib.Path, tuple[int, int] | _Bad] = {}  # image -> (W, H)
        self._scan(workers)
        self.lengths = [r.length for r in self.records]

    # -- the scan

    def _scan(self, workers: int) -> None:
        self.processor.tokenizer.encode_text("")  # builds the plain tokenizer before any thread
        with self._open() as f:
            lines = enumerate(f, 1)
            if workers:
                with ThreadPoolExecutor(workers) as pool:
                    while chunk := list(itertools.islice(lines, _SCAN_CHUNK * workers)):
                        for result in pool.map(self._scan_line, chunk):
                            self._keep(*result)
            else:
                for result in map(self._scan_line, lines):
                    self._keep(*result)
        self._sizes.clear()  # one entry per image: not worth keeping through training
        if not self.records:
            why = (f" ({self._skip_summary()}; first: {self.first_skip})" if self.skipped
                   else " (the file holds no records)")
            raise DataError(f"{self.name}: no usable examples{why}")

    def _open(self):
        regular_file(self.path, DataError)  # a FIFO would block the open, /dev/zero never ends
        try:
            return open(self.path, "rb")
        except OSError as e:
            raise DataError(f"{self.name}: cannot read it ({e.strerror or e})") from None

    def _keep(self, source: str, result: Record | _Bad | None) -> None:
        if isinstance(result, _Bad):
            error = DataError(f"{source}: {result}", reason=result.reason, source=source)
            if not self.skip_bad:
                raise error
            self.skipped[result.reason] = self.skipped.get(result.reason, 0) + 1
            self.first_skip = self.first_skip or str(error)
        elif result is not None:
            self.records.append(result)

    def _scan_line(self, numbered: tuple[int, bytes]) -> tuple[str, Record | _Bad | None]:
        lineno, raw = numbered
        source = f"{self.name}:{lineno}"
        try:
            return source, self._record(source, lineno, raw)
        except _Bad as bad:
            return source, bad

    def _record(self, source: str, lineno: int, raw: bytes) -> Record | None:
        """The line's Record, None for a blank line, or _Bad."""
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Bad("bad json", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _Bad("bad json", f"not JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise _Bad("bad json", "not JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise _Bad("bad record", f"a record must be a JSON object, got {_kind(obj)}")
        unknown = sorted(set(obj) - set(RECORD_KEYS))
        if unknown:
            raise _Bad("bad record", f"unknown key {unknown[0]!r} (a record has 'image' and "
                                     "'messages')")
        turns = _turns(obj)
        for k, (_, answer) in enumerate(turns, 1):
            try:
                check_points(answer)
            except PointsFormatError as e:
                raise _Bad("malformed points", f"malformed points in answer {k}: {e}") from None
        image = self._image_path(obj.get("image"))
        n_image = 0
        if image is not None:
            width, height = self._image_size(image)
            n_image = self.processor.image_token_count(width, height)
        try:  # the text-only prompt: the same tokens as with an image, minus the image tokens
            first = self.processor(turns[0][0], max_length=_NO_LIMIT)["input_ids"]
            pieces = _continuation(self.processor.tokenizer, turns)
        except MolmoeError as e:  # a lone surrogate from a "\ud800" escape
            raise _Bad("bad record", f"text cannot be tokenised: {e}") from None
        length = len(first) + n_image + sum(len(ids) for ids, _ in pieces)
        if self.max_length is not None and length > self.max_length:
            raise _Bad("too long", f"example needs {length} tokens ({n_image} image tokens), "
                                   f"over max_length {self.max_length}")
        answers = sum(len(ids) for ids, is_answer in pieces if is_answer)
        return Record(source, image, turns, length, answers)

    def _image_path(self, value) -> pathlib.Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise _Bad("bad record", f"'image' must be a path string or null, got "
                                     f"{_kind(value)} {value!r}"[:200])
        return self.path.parent.absolute() / value  # an absolute value stays as it is

    def _image_size(self, path: pathlib.Path) -> tuple[int, int]:
        """(W, H) of the decoded image, as the processor will see it; decoded once per path."""
        if path not in self._sizes:
            try:
                if not os.path.exists(path):
                    raise _Bad("missing image", f"missing image {path}")
                loaded = load_image(path, max_pixels=self.processor.max_pixels,
                                    compat=self.processor.compat)
                self._sizes[path] = loaded.size
            except ImageError as e:  # the message names the file
                self._sizes[path] = _Bad("unreadable image", f"unreadable image: {e}")
            except _Bad as bad:
                self._sizes[path] = bad
        size = self._sizes[path]
        if isinstance(size, _Bad):  # a fresh exception: threads may raise it at the same time
            raise _Bad(size.reason, str(size))
        return size

    # -- what the trainer reads

    def _skip_summary(self) -> str:
        total = sum(self.skipped.values())
        parts = ", ".join(f"{self.skipped[r]} {r}" for r in SKIP_REASONS if r in self.skipped)
        return f"{total} skipped ({parts})"

    def report(self) -> str:
        """One line: examples kept, records skipped per reason and the first skip's error."""
        n = len(self.records)
        head = f"{self.name}: {n} example{'' if n == 1 else 's'}"
        if not self.skipped:
            return head + ", none skipped"
        return f"{head}, {self._skip_summary()}: first: {self.first_skip}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        record = self.records[i]
        try:
            out = self.processor(record.turns[0][0], images=record.image, max_length=_NO_LIMIT)
        except MolmoeError as e:  # the image changed or went away since the scan
            raise DataError(f"{record.source}: {e}", source=record.source) from None
        pieces = _continuation(self.processor.tokenizer, record.turns)
        first = out["input_ids"]
        input_ids = torch.cat([first] + [torch.tensor(ids, dtype=torch.int64)
                                         for ids, _ in pieces])
        loss_mask = torch.cat([torch.zeros(len(first), dtype=torch.bool)] + [
            torch.full((len(ids),), is_answer, dtype=torch.bool) for ids, is_answer in pieces])
        if len(input_ids) != record.length:
            raise DataError(f"{record.source}: the example has {len(input_ids)} tokens, the scan "
                            f"counted {record.length} (did {record.image} change?)",
                            source=record.source)
        return Example(input_ids, loss_mask, out.get("images"), out.get("image_masks"),
                       out.get("image_input_idx"), record.source)


def answer_tokens(dataset: TrainingData, indices) -> int:
    """The answer tokens of these records (no pixel work): a global batch's count, which the
    trainer passes to training_loss(ce_tokens=) on every micro-batch."""
    return sum(dataset.records[i].answer_tokens for i in indices)


# ----------------------------------------------------------------------------- batches


def collate(examples: list[Example]) -> tuple[dict, torch.Tensor]:
    """Examples -> (inputs, loss_mask), RIGHT-padded as the official collator pads: input_ids
    (B, S) int64 with -1, loss_mask (B, S) bool False on padding. With any image: images
    (B, T, P, F), image_masks (B, T, P), image_input_idx (B, T, Q) padded with -1 crops and
    crop_valid (B, T); a text-only example gets only -1 crops. `model(**inputs)` and
    `training_loss(model, inputs, loss_mask)` take them as they are."""
    if not examples:
        raise UsageError("collate needs at least one example")
    B, S = len(examples), max(len(e.input_ids) for e in examples)
    input_ids_BS = torch.full((B, S), PAD, dtype=torch.int64)
    loss_mask_BS = torch.zeros((B, S), dtype=torch.bool)
    for b, e in enumerate(examples):
        input_ids_BS[b, :len(e.input_ids)] = e.input_ids
        loss_mask_BS[b, :len(e.loss_mask)] = e.loss_mask
    inputs = {"input_ids": input_ids_BS}
    crops = pad_crops([{"images": e.images, "image_masks": e.image_masks,
                        "image_input_idx": e.image_input_idx} for e in examples], [0] * B)
    if crops is not None:  # right padding moves no token: image_input_idx stays as it is
        inputs.update(zip(("images", "image_masks", "image_input_idx", "crop_valid"), crops))
    return inputs, loss_mask_BS


def _positive(name: str, value, minimum: int = 1) -> int:
    if not is_integral(value) or value < minimum:
        raise UsageError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class BucketSampler:
    """Global batches of example indices, length-bucketed, as a pure function of (seed, step).

    Epoch e = step // steps_per_epoch permutes the indices with numpy's default_rng(seed + e)
    and drops the last len % global_batch; each window of global_batch * bucket_batches indices
    is sorted by length (stable), cut into global batches, and the epoch's batches are put in an
    order drawn from the same generator. Examples of one batch are so of similar length (little
    padding), while the order of batches stays random. Steps run on across epochs forever.
    """

    def __init__(self, lengths: list[int], global_batch: int, *, seed: int,
                 bucket_batches: int = 8):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch = _positive("global_batch", global_batch)
        self.bucket_batches = _positive("bucket_batches", bucket_batches)
        self.seed = _positive("seed", seed, minimum=0)
        self.steps_per_epoch = len(self.lengths) // self.global_batch
        if self.steps_per_epoch == 0:
            raise UsageError(f"the dataset has {len(self.lengths)} examples, fewer than one "
                             f"global batch of {self.global_batch}")
        self._epoch, self._batches = -1, None  # the last epoch's batches, reused step by step

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global_batch) indices of `epoch`, in step order."""
        rng = np.random.default_rng(self.seed + epoch)
        order = rng.permutation(len(self.lengths))[:self.steps_per_epoch * self.global_batch]
        window = self.global_batch * self.bucket_batches
        for start in range(0, len(order), window):
            w = order[start:start + window]
            order[start:start + window] = w[np.argsort(self.lengths[w], kind="stable")]
        batches = order.reshape(self.steps_per_epoch, self.global_batch)
        return batches[rng.permutation(self.steps_per_epoch)]

    def batch(self, step: int) -> list[int]:
        """The indices of global batch `step` (0-based)."""
        epoch, k = divmod(_positive("step", step, minimum=0), self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self.epoch_batches(epoch)
        return self._batches[k].tolist()


def _accum(sampler: BucketSampler, world: int, micro_batch: int) -> int:
    """Micro-batches per rank and step; the global batch must split evenly."""
    per_step = _positive("world", world) * _positive("micro_batch", micro_batch)
    if sampler.global_batch % per_step:
        raise UsageError(f"global batch {sampler.global_batch} is not divisible by world "
                         f"{world} x micro_batch {micro_batch}")
    return sampler.global_batch // per_step


def rank_batches(sampler: BucketSampler, *, rank: int, world: int, micro_batch: int,
                 start_step: int, steps: int):
    """(step, micro_index, indices) for `rank`'s micro-batches of steps start_step ..
    start_step + steps - 1: rank r takes batch[r*L:(r+1)*L] (L = global_batch / world) and
    splits it, in order, into global_batch / (world * micro_batch) micro-batches."""
    accum = _accum(sampler, world, micro_batch)
    if not is_integral(rank) or not 0 <= rank < world:
        raise UsageError(f"rank must be in 0..{world - 1}, got {rank!r}")
    start_step = _positive("start_step", start_step, minimum=0)
    steps = _positive("steps", steps, minimum=0)
    share = sampler.global_batch // world

    def generate():
        for step in range(start_step, start_step + steps):
            mine = sampler.batch(step)[rank * share:(rank + 1) * share]
            for m in range(accum):
                yield step, m, mine[m * micro_batch:(m + 1) * micro_batch]
    return generate()


class _KeyedBatches:
    """The DataLoader's batch_sampler: each micro-batch as keys (step, micro_index, index), so
    the step travels with the examples through the workers."""

    def __init__(self, sampler, **kwargs):
        self.sampler, self.kwargs = sampler, kwargs
        self.length = kwargs["steps"] * _accum(sampler, kwargs["world"], kwargs["micro_batch"])
        rank_batches(sampler, **kwargs)  # checks the arguments now, not in the first next()

    def __iter__(self):
        for step, m, indices in rank_batches(self.sampler, **self.kwargs):
            yield [(step, m, i) for i in indices]

    def __len__(self) -> int:
        return self.length


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, key):
        step, m, i = key
        return step, m, self.dataset[i]

    def __len__(self) -> int:
        return len(self.dataset)


def _collate_keyed(items) -> tuple[int, int, dict, torch.Tensor]:
    step, m, _ = items[0]
    inputs, loss_mask = collate([example for _, _, example in items])
    return step, m, inputs, loss_mask


def loader(dataset: TrainingData, sampler: BucketSampler, *, rank: int = 0, world: int = 1,
           micro_batch: int, start_step: int = 0, steps: int,
           num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader yielding (step, micro_index, inputs, loss_mask) for `rank`, in step order,
    the same for any num_workers (workers preprocess; the DataLoader keeps the order).
    Workers are persistent when num_workers > 0."""
    batches = _KeyedBatches(sampler, rank=rank, world=world, micro_batch=micro_batch,
                            start_step=start_step, steps=steps)
    num_workers = _positive("num_workers", num_workers, minimum=0)
    return torch.utils.data.DataLoader(_Keyed(dataset), batch_sampler=batches,
                                       collate_fn=_collate_keyed, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)
