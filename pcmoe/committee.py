"""The Parameter Committee of one MoE layer: which experts are resident, and in which slot.

Pure bookkeeping: ids and small integer tensors, no weights and no I/O. A layer owns S slots
(its committee size plus spare slots that swaps load into). `mask` is what masked gating uses:
an expert is a member exactly while its slot holds it and it has been switched in.
"""

from __future__ import annotations

import torch


class LayerCommittee:
    def __init__(self, num_experts: int, num_slots: int):
        if not 1 <= num_slots:
            raise ValueError("a layer needs at least one slot")
        self.num_experts = num_experts
        self.num_slots = num_slots
        # [N + 1]: slot of each expert, -1 = absent; the extra last entry (-1) is what an expert id of
        # -1 ("no expert") indexes, so mapping ids to slots is a single gather.
        self.expert_to_slot = torch.full((num_experts + 1,), -1, dtype=torch.long)
        self.slot_to_expert = [-1] * num_slots                                  # [S], -1 = empty
        self.mask = torch.zeros(num_experts, dtype=torch.bool)                 # [N] members
        self.slot_list = [-1] * num_experts  # expert -> slot as a Python list, for single-token routing
        self.member_list = [False] * num_experts  # [N] `mask` as a Python list, kept with it (single-token gating)
        self.reserved: set[int] = set()  # empty slots an in-flight load is writing into

    # -- queries -----------------------------------------------------------------------------

    def members(self) -> list[int]:
        return [e for e in self.slot_to_expert if e >= 0]

    def is_member(self, expert: int) -> bool:
        return self.slot_list[expert] >= 0

    def free_slots(self) -> list[int]:
        return [s for s, e in enumerate(self.slot_to_expert) if e < 0 and s not in self.reserved]

    def slots_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Map expert ids (any shape, -1 allowed) to slots, -1 where absent."""
        return self.expert_to_slot[idx]

    @property
    def complete(self) -> bool:
        """Every expert of the layer is a member."""
        return self.num_slots >= self.num_experts and -1 not in self.slot_to_expert[:self.num_experts]

    # -- changes (called between forward passes only) ----------------------------------------

    def install(self, expert: int, slot: int) -> None:
        if self.slot_to_expert[slot] >= 0:
            raise RuntimeError(f"slot {slot} still holds expert {self.slot_to_expert[slot]}")
        if self.mask[expert]:
            raise RuntimeError(f"expert {expert} is already resident")
        self.reserved.discard(slot)
        self.slot_to_expert[slot] = expert
        self.expert_to_slot[expert] = slot
        self.mask[expert] = True
        self.slot_list[expert] = slot
        self.member_list[expert] = True

    def evict(self, expert: int) -> int:
        """Remove a member; its slot becomes free (the caller may then overwrite it)."""
        slot = int(self.expert_to_slot[expert])
        if slot < 0:
            raise RuntimeError(f"expert {expert} is not resident")
        self.mask[expert] = False
        self.expert_to_slot[expert] = -1
        self.slot_list[expert] = -1
        self.member_list[expert] = False
        self.slot_to_expert[slot] = -1
        return slot

    def reserve(self, slot: int) -> None:
        if self.slot_to_expert[slot] >= 0 or slot in self.reserved:
            raise RuntimeError(f"slot {slot} is not free")
        self.reserved.add(slot)

    def release(self, slot: int) -> None:
        self.reserved.discard(slot)

    def replace(self, incoming: int, outgoing: int) -> int:
        """Between two forwards: `incoming` takes over the slot of member `outgoing`, whose weights
        the caller has just overwritten with the incoming expert's. Returns the slot."""
        slot = self.evict(outgoing)
        self.install(incoming, slot)
        return slot

    def switch(self, incoming: int, outgoing: int, slot: int) -> None:
        """Atomically (between two forwards) swap `outgoing` for `incoming`, which was loaded into
        the reserved `slot`. The outgoing expert's slot becomes free afterwards, never before."""
        self.install(incoming, slot)
        if outgoing >= 0:
            self.evict(outgoing)

    def resize(self, num_slots: int, keep: list[int]) -> list[int]:
        """Between forwards, with no load in flight: the layer gets `num_slots` slots holding exactly
        the members `keep` (a subset of the members, at most num_slots), packed into the first slots
        in their old slot order; the other slots are empty. Returns, per new slot, the old slot whose
        weights it takes (-1 = empty): what the bank copies (moe.SlotExperts.resize)."""
        if self.reserved:
            raise RuntimeError("cannot resize a committee while loads are in flight")
        if not 1 <= num_slots:
            raise ValueError("a layer needs at least one slot")
        kept = set(keep)
        if not kept <= set(self.members()) or len(kept) > num_slots:
            raise ValueError("the members kept must be current members that fit the new slots")
        sources = [s for s, e in enumerate(self.slot_to_expert) if e in kept]
        experts = [self.slot_to_expert[s] for s in sources]
        sources += [-1] * (num_slots - len(sources))
        self.num_slots = num_slots
        self.expert_to_slot.fill_(-1)
        self.slot_to_expert = [-1] * num_slots
        self.mask.zero_()
        self.slot_list = [-1] * self.num_experts
        self.member_list = [False] * self.num_experts
        for slot, e in enumerate(experts):
            self.install(e, slot)
        return sources
