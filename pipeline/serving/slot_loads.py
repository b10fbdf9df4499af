"""Slot loads of the fast engine from many request threads, landed together by one thread (`SlotLoads`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from pipeline.models.multilora import AdapterLimitError
from pipeline.serving.engine import EngineError
from pipeline.serving.fast_llama import PackedAdapter


class _Load:
    __slots__ = ("done", "error", "packed", "slot")

    def __init__(self, slot: int, packed: PackedAdapter) -> None:
        self.slot = slot
        self.packed = packed
        self.done = threading.Event()
        self.error: BaseException | None = None


class SlotLoads:
    """Slot loads from many request threads, landed together by one thread: what queued while the last batch landed
    goes as one batch, copied into one pinned buffer (one host copy), to the device in one transfer on a side stream
    of its own, and scattered into its slot rows in one operation per rank; each caller returns when its batch
    landed. A load alone took ~10 torch calls on its request thread, each giving the GIL away and waiting to get it
    back from the engine thread and the HTTP side; a batch of k loads takes about as many in all. (On the CPU: the
    same batching, no streams.)"""

    #: Loads in one batch at most, and its bytes (a bigger adapter goes alone).
    MAX_LOADS = 64
    MAX_BYTES = 32 << 20

    def __init__(
        self,
        lora: torch.Tensor,
        ranks: torch.Tensor,
        stream: torch.cuda.Stream | None,
        values_of: Callable[[int], int],
        index_of: Callable[[int], torch.Tensor],
    ) -> None:
        """``lora`` [slots, values] and ``ranks`` [slots] are the engine's slot tensors, ``stream`` the side stream
        of the loads (None on the CPU), ``values_of(r)`` the length of a packed rank-r adapter and ``index_of(r)``
        where each of its values goes in a slot row (on the slots' device)."""
        self.lora, self.ranks, self.stream = lora, ranks, stream
        self.values_of, self.index_of = values_of, index_of
        cuda = lora.device.type == "cuda"
        size = max(lora.shape[1], self.MAX_BYTES // lora.element_size())
        self.capacity = size
        self.host = torch.empty(size, dtype=lora.dtype, pin_memory=cuda)
        self.host_rows = torch.zeros(self.MAX_LOADS, dtype=torch.long, pin_memory=cuda)
        self.host_ranks = torch.zeros(self.MAX_LOADS, dtype=torch.int32, pin_memory=cuda)
        self._rows_np = self.host_rows.numpy()  # the same (pinned) memory, written without torch calls
        self._ranks_np = self.host_ranks.numpy()
        if cuda:
            self.dev = torch.empty(size, dtype=lora.dtype, device=lora.device)
            self.dev_rows = torch.zeros(self.MAX_LOADS, dtype=torch.long, device=lora.device)
            self.dev_ranks = torch.zeros(self.MAX_LOADS, dtype=torch.int32, device=lora.device)
            self.event = torch.cuda.Event()
        self.batches = 0  # batches landed (for tests and benchmarks)
        self.loads = 0
        self._queue: queue.SimpleQueue[_Load | None] = queue.SimpleQueue()
        self._carry: _Load | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="persona-slot-loads", daemon=True)
        self._thread.start()

    def load(self, slot: int, packed: PackedAdapter) -> None:
        if self._closed:
            raise EngineError("the engine is closed")
        if packed.data.numel() > self.capacity:
            raise AdapterLimitError(f"packed adapter of {packed.data.numel()} values is larger than a slot")
        item = _Load(slot, packed)
        self._queue.put(item)
        item.done.wait()
        if item.error is not None:
            raise item.error

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=10)
        while True:  # loads queued behind the end: their callers get an error, not a wait forever
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.error = EngineError("the engine is closed")
                item.done.set()

    def _run(self) -> None:
        while True:
            first = self._carry if self._carry is not None else self._queue.get()
            self._carry = None
            if first is None:
                return
            batch, slots, values = [first], {first.slot}, first.packed.data.numel()
            stop = False
            while len(batch) < self.MAX_LOADS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                n = nxt.packed.data.numel()
                if nxt.slot in slots or values + n > self.capacity:
                    self._carry = nxt  # the next batch's first
                    break
                batch.append(nxt)
                slots.add(nxt.slot)
                values += n
            try:
                self._land(batch, values)
            except BaseException as e:  # every caller of the batch gets the error
                for item in batch:
                    item.error = e
            for item in batch:
                item.done.set()
            if stop:
                if self._carry is not None:
                    self._carry.error = EngineError("the engine closed")
                    self._carry.done.set()
                return

    def _land(self, batch: list[_Load], values: int) -> None:
        batch.sort(key=lambda item: item.packed.rank)
        k = len(batch)
        host = self.host[:values]
        torch.cat([item.packed.data.reshape(-1) for item in batch], out=host)
        self._rows_np[:k] = [item.slot for item in batch]
        self._ranks_np[:k] = [item.packed.rank for item in batch]
        if self.stream is None:
            self._scatter(host, self.host_rows[:k], self.host_ranks[:k], batch)
        else:
            with torch.cuda.stream(self.stream):
                data = self.dev[:values]
                data.copy_(host, non_blocking=True)
                rows = self.dev_rows[:k]
                rows.copy_(self.host_rows[:k], non_blocking=True)
                ranks = self.dev_ranks[:k]
                ranks.copy_(self.host_ranks[:k], non_blocking=True)
                self._scatter(data, rows, ranks, batch)
                self.event.record()
            self.event.synchronize()  # the pinned buffers are free again, and the callers' slots are loaded
        self.batches += 1
        self.loads += k

    def _scatter(self, data: torch.Tensor, rows: torch.Tensor, ranks: torch.Tensor, batch: list[_Load]) -> None:
        lora = self.lora
        lora.index_fill_(0, rows, 0)  # a rank below the slots' leaves the rest of its row zero
        off = start = 0
        while start < len(batch):
            r = batch[start].packed.rank
            end = start
            while end < len(batch) and batch[end].packed.rank == r:
                end += 1
            n = self.values_of(r)
            block = data[off : off + (end - start) * n].view(end - start, n)
            lora.index_put_((rows[start:end, None], self.index_of(r)[None, :]), block)
            off += (end - start) * n
            start = end
        self.ranks.index_copy_(0, rows, ranks)
