"""Free-capacity index: the ledger's usage as numpy arrays, one row per node, one column per device.

The scheduler filters every node of a 10,000-node cluster with a handful of vectorised comparisons
here instead of a Python loop over nodes (DESIGN: "index free capacity instead of scanning every
node"). Only :class:`hami_ray.core.ledger.Ledger` writes it; policies read it through
:class:`hami_ray.core.policies.framework.ClusterView`.

A ``version`` counter per row changes whenever that node's usage or inventory changes, so score caches
know which rows to recompute; :meth:`CapacityIndex.changed_since` lists the rows that moved since a
cache last looked, so that it need not compare every row's version either.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from hami_ray.core.model import FULL_CORES, DeviceMode, Node

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
CHANGE_LOG = 1 << 16  # version moves remembered by changed_since (a cache older than that rescans)


class CapacityIndex:
    """Column-oriented copy of capacity and usage, kept in step with the ledger."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.names: list[str] = []
        self.models: list[str] = []  # interned device model names, indexed by ``model_id``
        self.model_vendors: list[str] = []  # the vendor of each interned model
        self._model_ids: dict[str, int] = {}
        self._free_rows: list[int] = []
        self.tags: list[dict[str, int]] = []  # per row: slices by shape tag ("share-gpu", "2-gpu")
        self.inventory = 0  # moves on whenever a node is put or dropped: capacity caches key on it
        self.changes: list[int] = []  # rows in the order their version moved (the last CHANGE_LOG at least)
        self.changed = 0  # version moves ever: a cache that saw ``changed == m`` refreshes changed_since(m)
        self._alloc(0, 0)

    # --- storage -----------------------------------------------------------------------------
    def _alloc(self, n: int, d: int) -> None:
        self.width = d
        self.alive: BoolArray = np.zeros(n, dtype=bool)
        self.version: IntArray = np.zeros(n, dtype=np.int64)
        self.cpu_cap: IntArray = np.zeros(n, dtype=np.int64)
        self.cpu_used: IntArray = np.zeros(n, dtype=np.int64)
        self.hmem_cap: IntArray = np.zeros(n, dtype=np.int64)
        self.hmem_used: IntArray = np.zeros(n, dtype=np.int64)
        self.exists: BoolArray = np.zeros((n, d), dtype=bool)
        self.healthy: BoolArray = np.zeros((n, d), dtype=bool)
        self.model_id: IntArray = np.full((n, d), -1, dtype=np.int64)
        self.numa: IntArray = np.zeros((n, d), dtype=np.int64)
        self.mem_cap: IntArray = np.zeros((n, d), dtype=np.int64)
        self.mem_used: IntArray = np.zeros((n, d), dtype=np.int64)
        self.core_cap: IntArray = np.zeros((n, d), dtype=np.int64)
        self.core_used: IntArray = np.zeros((n, d), dtype=np.int64)
        self.slot_cap: IntArray = np.zeros((n, d), dtype=np.int64)
        self.slot_used: IntArray = np.zeros((n, d), dtype=np.int64)
        self.excl: BoolArray = np.zeros((n, d), dtype=bool)  # held by a 100-core slice
        self.grade: IntArray = np.zeros((n, d), dtype=np.int64)  # isolation rank of a shared slice
        self.grade_whole: IntArray = np.zeros((n, d), dtype=np.int64)  # ... of a whole-device slice
        self.whole: BoolArray = np.zeros((n, d), dtype=bool)  # a MIG instance: every slice takes all of it
        # per-node sums of the device columns above (HAMi's node score reads only these)
        self.node_mem_cap: IntArray = np.zeros(n, dtype=np.int64)
        self.node_mem_used: IntArray = np.zeros(n, dtype=np.int64)
        self.node_core_cap: IntArray = np.zeros(n, dtype=np.int64)
        self.node_core_used: IntArray = np.zeros(n, dtype=np.int64)
        self.node_slot_cap: IntArray = np.zeros(n, dtype=np.int64)
        self.node_slot_used: IntArray = np.zeros(n, dtype=np.int64)

    def _grow(self, n: int, d: int) -> None:
        old_n, old_d = self.alive.shape[0], self.width
        if n <= old_n and d <= old_d:
            return
        n, d = max(n, old_n, 2 * old_n), max(d, old_d)
        old = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        self._alloc(n, d)
        for key, arr in old.items():
            target = getattr(self, key)
            if arr.ndim == 1:
                target[:old_n] = arr
            else:
                target[:old_n, :old_d] = arr

    def model_index(self, model: str, vendor: str) -> int:
        key = f"{vendor}\0{model}"
        mid = self._model_ids.get(key)
        if mid is None:
            mid = self._model_ids[key] = len(self.models)
            self.models.append(model)
            self.model_vendors.append(vendor)
        return mid

    # --- rows --------------------------------------------------------------------------------
    def put_node(self, node: Node) -> int:
        """Insert or replace a node's inventory; usage of its row is reset (the ledger replays it)."""
        row = self.rows.get(node.name)
        if row is None:
            if self._free_rows:
                row = self._free_rows.pop()
            else:
                row = len(self.names)
                self.names.append("")
                self.tags.append({})
            self.rows[node.name] = row
            self.names[row] = node.name
        self._grow(row + 1, len(node.devices))
        self.alive[row] = True
        self.cpu_cap[row] = node.cpu_milli
        self.hmem_cap[row] = node.memory_mib
        self.cpu_used[row] = 0
        self.hmem_used[row] = 0
        self.tags[row] = {}
        for arr in (self.mem_used, self.core_used, self.slot_used, self.mem_cap, self.core_cap,
                    self.slot_cap, self.numa, self.grade, self.grade_whole):
            arr[row] = 0
        self.whole[row] = False
        self.exists[row] = False
        self.healthy[row] = False
        self.excl[row] = False
        self.model_id[row] = -1
        for col, dev in enumerate(node.devices):
            self.exists[row, col] = True
            self.healthy[row, col] = dev.healthy
            self.model_id[row, col] = self.model_index(dev.model, dev.vendor)
            self.numa[row, col] = dev.numa
            self.mem_cap[row, col] = dev.memory_capacity_mib
            self.core_cap[row, col] = dev.core_capacity
            self.slot_cap[row, col] = dev.slice_capacity
            self.grade[row, col] = dev.grade_for(0).rank
            self.grade_whole[row, col] = dev.grade_for(FULL_CORES).rank
            self.whole[row, col] = dev.mode is DeviceMode.MIG
        self.node_mem_cap[row] = self.mem_cap[row].sum()
        self.node_core_cap[row] = self.core_cap[row].sum()
        self.node_slot_cap[row] = self.slot_cap[row].sum()
        self.node_mem_used[row] = self.node_core_used[row] = self.node_slot_used[row] = 0
        self._moved(row)
        self.inventory += 1
        return row

    def drop_node(self, name: str) -> None:
        row = self.rows.pop(name)
        self.alive[row] = False
        self.exists[row] = False
        for arr in (self.node_mem_cap, self.node_mem_used, self.node_core_cap, self.node_core_used,
                    self.node_slot_cap, self.node_slot_used):
            arr[row] = 0
        self._moved(row)
        self.inventory += 1
        self.names[row] = ""
        self._free_rows.append(row)

    def state_key(self, row: int) -> bytes:
        """Everything placement on this row depends on, as bytes (for score memos across rows)."""
        parts = (self.model_id[row], self.mem_cap[row], self.mem_used[row], self.core_cap[row],
                 self.core_used[row], self.slot_cap[row], self.slot_used[row], self.excl[row].astype(np.int64),
                 self.healthy[row].astype(np.int64), self.numa[row], self.grade[row], self.grade_whole[row],
                 self.whole[row].astype(np.int64),
                 np.array([self.cpu_cap[row] - self.cpu_used[row], self.hmem_cap[row] - self.hmem_used[row],
                           int(self.cpu_cap[row] == 0), int(self.hmem_cap[row] == 0)], dtype=np.int64))
        return np.concatenate(parts).tobytes()

    def add_usage(self, row: int, col: int, mem: int, cores: int, sign: int) -> None:
        self.mem_used[row, col] += sign * mem
        self.core_used[row, col] += sign * cores
        self.slot_used[row, col] += sign
        self.node_mem_used[row] += sign * mem
        self.node_core_used[row] += sign * cores
        self.node_slot_used[row] += sign
        if cores >= 100:
            self.excl[row, col] = sign > 0

    def add_tag(self, row: int, tag: str, sign: int) -> None:
        tags = self.tags[row]
        tags[tag] = tags.get(tag, 0) + sign
        if tags[tag] <= 0:
            del tags[tag]

    def add_host(self, row: int, cpu: int, hmem: int, sign: int) -> None:
        self.cpu_used[row] += sign * cpu
        self.hmem_used[row] += sign * hmem
        self._moved(row)

    def _moved(self, row: int) -> None:
        self.version[row] += 1
        self.changes.append(row)
        self.changed += 1
        if len(self.changes) > 2 * CHANGE_LOG:
            del self.changes[:CHANGE_LOG]

    def changed_since(self, mark: int) -> list[int] | None:
        """Rows whose version moved after :attr:`changed` was ``mark`` (a row may repeat), or None when
        that is longer ago than the log remembers.

        Example: ``m = index.changed; ledger.allocate(lease); index.changed_since(m)`` -> ``[row]``.
        """
        start = len(self.changes) - (self.changed - mark)
        return None if start < 0 else self.changes[start:]

    @property
    def size(self) -> int:
        """Number of row slots in use (including dead rows awaiting reuse)."""
        return len(self.names)
