"""Which auxiliary layer feeds each base layer (Horton et al., 2024, section 3).

- LP (layer-pruned aux): base layer i reads the aux layer that is the largest kept
  base layer <= i, so a pruned layer is predicted from the kept layer just before it.
- C (canonical / narrower aux): contiguous chunks, larger chunks first.
"""

from __future__ import annotations

from ..errors import KvpError


def lp_map(kept: list[int], n_base: int) -> list[int]:
    if not kept or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n_base:
        raise KvpError(f"kept layers must be sorted, unique and within 0..{n_base - 1}: {kept}")
    out, j = [], 0
    for i in range(n_base):
        while j + 1 < len(kept) and kept[j + 1] <= i:
            j += 1
        out.append(j)  # base layers before kept[0] (if any) read aux layer 0
    return out


def c_map(n_aux: int, n_base: int) -> list[int]:
    if not 0 < n_aux <= n_base:
        raise KvpError(f"an auxiliary model of {n_aux} layers cannot feed {n_base} base layers")
    q, r = divmod(n_base, n_aux)
    out = []
    for j in range(n_aux):
        out += [j] * (q + 1 if j < r else q)
    return out
