"""Streamed causal-LM training text (`data.streaming: true`): nothing prepared, nothing held.

The train source is opened with `datasets` streaming (a local csv/json/jsonl/parquet/text file or
folder, or a hub dataset), shuffled in a buffer of `data.shuffle_buffer` texts (seeded with the
run's seed; a new order every epoch: `IterableDataset.set_epoch`), split between the ranks
(`datasets.distributed.split_dataset_by_node`: whole shards per rank where the shards divide evenly,
otherwise every rank reads the stream and keeps its share of the texts), tokenized a batch of texts
at a time and packed into blocks exactly as `prepared.pack_stream` packs a prepared corpus. Memory
holds the shuffle buffer and one batch of texts, whatever the corpus size; start-up reads nothing.

Exact resume: a checkpoint records (epoch, micro-batches taken in the epoch), as for the other
training sets; `set_epoch(epoch, skip_samples)` replays the same seeded order and skips the blocks
already trained on, so a resumed run sees exactly the blocks the uninterrupted run would have (the
skipped text is tokenized again, not trained on: resuming late in a long epoch costs that reading).

What a stream cannot do is refused by the task before anything is written (tasks/causal_lm.py):
an epoch-based schedule (no length: training.max_steps), a validation split carved out of the
stream, random subsampling, mixtures, routes, teachers with other tokenizers, caches and trimming,
which all need the whole training split first. Texts equal to a validation text are dropped, as
`data.drop_duplicate_texts` does for a read split; duplicates within the stream are kept (finding
them would hold every text seen).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

from torch.utils.data import IterableDataset

from distill.data.text import INDEX, LABELS, SOURCE, is_missing, text_key

BATCH = 1000  # texts per tokenizer call and per packing step, as prepared.BATCH


def check_stream(source, data) -> None:
    """Refuse, before anything is written, a train source that cannot be streamed: a missing or
    unreadable file, or a first row without the text field (ConfigError naming the key)."""
    from distill.data.text import load_source
    from distill.errors import ConfigError

    field = data.text_fields[0]
    try:
        first = next(iter(load_source(source, "train", streaming=True)), None)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"data.train.path: cannot stream {source.path}: {str(error).splitlines()[0][:200]}") from error
    if first is None:
        raise ConfigError(f"data.train.path: {source.path} has no rows")
    if field not in first:
        raise ConfigError(f"data.train.path: {source.path} has no column {field!r} (it has {sorted(first)}): "
                          "set data.text_fields")


class StreamedBlocks(IterableDataset):
    """This rank's blocks of one pass over the streamed train source; `set_epoch` picks the pass
    (and the blocks of it to skip), as the samplers of the other training sets do."""

    def __init__(self, source, data, tokenizer, eos_id: int, seed: int, rank: int, world_size: int,
                 exclude: Optional[set] = None):
        self.source, self.data, self.tokenizer, self.eos_id = source, data, tokenizer, eos_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.exclude = exclude or set()  # text_key of each validation text
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_samples

    def texts(self) -> Iterator[str]:
        """This rank's texts of the epoch, in the epoch's seeded order."""
        from datasets.distributed import split_dataset_by_node

        from distill.data.text import load_source

        field = self.data.text_fields[0]
        stream = load_source(self.source, "train", streaming=True)
        stream = stream.shuffle(seed=self.seed, buffer_size=self.data.shuffle_buffer)
        stream.set_epoch(self.epoch)
        if self.world_size > 1:
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        for row in stream:
            text = row.get(field)
            if is_missing(text):
                continue
            text = str(text)
            if self.exclude and text_key(text) in self.exclude:
                continue
            yield text

    def blocks(self) -> Iterator[Dict]:
        """Every block of this rank's epoch, from the first (index: its place in the epoch)."""
        from distill.data.prepared import pack_stream

        def token_batches():
            batch = []
            for text in self.texts():
                batch.append(text)
                if len(batch) == BATCH:
                    yield self.tokenizer(batch)["input_ids"]
                    batch = []
            if batch:
                yield self.tokenizer(batch)["input_ids"]

        index = 0
        for inputs, labels in pack_stream(token_batches(), self.eos_id, self.data.block_size):
            for ids, targets in zip(inputs.tolist(), labels.tolist()):
                yield {"input_ids": ids, LABELS: targets, SOURCE: 0, INDEX: index}
                index += 1

    def __iter__(self) -> Iterator[Dict]:
        import torch.utils.data

        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("StreamedBlocks is read in the training process (DataLoader num_workers=0)")
        for position, block in enumerate(self.blocks()):
            if position >= self.skip:
                yield block
