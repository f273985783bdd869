"""An independent RFC 9162 section 2.1 implementation, for tests only.

Written from the RFC text, definition by definition, with no regard for speed and sharing no
code with `domain.merkle`: MTH (2.1.1), PATH (2.1.3.1), PROOF/SUBPROOF (2.1.4.1) recurse over
lists of entries exactly as printed, and the verifiers follow the numbered steps of 2.1.3.2
and 2.1.4.2. Tests compare the production tree and verifiers against these.
"""

from __future__ import annotations

import hashlib


def HASH(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def MTH(D: list[bytes]) -> bytes:
    """2.1.1: MTH({}) = HASH(); MTH({d0}) = HASH(0x00 || d0); else HASH(0x01 || MTH(D[0:k]) || MTH(D[k:n]))."""
    n = len(D)
    if n == 0:
        return HASH(b"")
    if n == 1:
        return HASH(b"\x00" + D[0])
    k = largest_power_of_two_smaller_than(n)
    return HASH(b"\x01" + MTH(D[0:k]) + MTH(D[k:n]))


def largest_power_of_two_smaller_than(n: int) -> int:
    """k such that k < n <= 2k (n > 1), found by doubling, as the RFC words it."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def PATH(m: int, D: list[bytes]) -> list[bytes]:
    """2.1.3.1: the audit path for the (m+1)th leaf of D[n], 0 <= m < n."""
    n = len(D)
    if n == 1:
        return []
    k = largest_power_of_two_smaller_than(n)
    if m < k:
        return [*PATH(m, D[0:k]), MTH(D[k:n])]
    return [*PATH(m - k, D[k:n]), MTH(D[0:k])]


def PROOF(m: int, D: list[bytes]) -> list[bytes]:
    """2.1.4.1: PROOF(m, D[n]) = SUBPROOF(m, D[n], true), for 0 < m < n."""
    return SUBPROOF(m, D, True)


def SUBPROOF(m: int, D: list[bytes], b: bool) -> list[bytes]:
    n = len(D)
    if m == n:
        return [] if b else [MTH(D)]
    k = largest_power_of_two_smaller_than(n)
    if m <= k:
        return [*SUBPROOF(m, D[0:k], b), MTH(D[k:n])]
    return [*SUBPROOF(m - k, D[k:n], False), MTH(D[0:k])]


def LSB(x: int) -> int:
    return x & 1


def verify_inclusion(
    leaf_index: int, tree_size: int, hash_: bytes, inclusion_path: list[bytes], root_hash: bytes
) -> bool:
    """2.1.3.2, step by step. `hash_` is the leaf hash HASH(0x00 || entry)."""
    # 1. Compare leaf_index from the inclusion_proof input with tree_size ... If leaf_index is
    #    greater than or equal to tree_size, then fail the proof verification.
    if leaf_index >= tree_size:
        return False
    # 2. Set fn to leaf_index and sn to tree_size - 1.
    fn, sn = leaf_index, tree_size - 1
    # 3. Set r to hash.
    r = hash_
    # 4. For each value p in the inclusion_path array:
    for p in inclusion_path:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            return False
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if LSB(fn) == 1 or fn == sn:
            # i. Set r to HASH(0x01 || p || r).
            r = HASH(b"\x01" + p + r)
            # ii. If LSB(fn) is not set, then right-shift both fn and sn equally until either
            #     LSB(fn) is set or fn is 0.
            if LSB(fn) == 0:
                while not (LSB(fn) == 1 or fn == 0):
                    fn, sn = fn >> 1, sn >> 1
        # Otherwise: Set r to HASH(0x01 || r || p).
        else:
            r = HASH(b"\x01" + r + p)
        # c. Finally, right-shift both fn and sn one time.
        fn, sn = fn >> 1, sn >> 1
    # 5. Compare sn to 0. Compare r against the root_hash. If sn is equal to 0 and r and the
    #    root_hash are equal, then the log has proven the inclusion of hash.
    return sn == 0 and r == root_hash


def verify_consistency(
    first: int, second: int, first_hash: bytes, second_hash: bytes, consistency_path: list[bytes]
) -> bool:
    """2.1.4.2, step by step (for 0 < first < second; the callers handle the trivial cases)."""
    # 1. If consistency_path is an empty array, stop and fail the proof verification.
    if not consistency_path:
        return False
    path = list(consistency_path)
    # 2. If first is an exact power of 2, then prepend first_hash to the consistency_path array.
    if first & (first - 1) == 0:
        path = [first_hash, *path]
    # 3. Set fn to first - 1 and sn to second - 1.
    fn, sn = first - 1, second - 1
    # 4. If LSB(fn) is set, then right-shift both fn and sn equally until LSB(fn) is not set.
    while LSB(fn) == 1:
        fn, sn = fn >> 1, sn >> 1
    # 5. Set both fr and sr to the first value in the consistency_path array.
    fr = sr = path[0]
    # 6. For each subsequent value c in the consistency_path array:
    for c in path[1:]:
        # a. If sn is 0, then stop the iteration and fail the proof verification.
        if sn == 0:
            return False
        # b. If LSB(fn) is set, or if fn is equal to sn, then:
        if LSB(fn) == 1 or fn == sn:
            # i. Set fr to HASH(0x01 || c || fr).  ii. Set sr to HASH(0x01 || c || sr).
            fr = HASH(b"\x01" + c + fr)
            sr = HASH(b"\x01" + c + sr)
            # iii. If LSB(fn) is not set, then right-shift both fn and sn equally until
            #      either LSB(fn) is set or fn is 0.
            if LSB(fn) == 0:
                while not (LSB(fn) == 1 or fn == 0):
                    fn, sn = fn >> 1, sn >> 1
        # Otherwise: Set sr to HASH(0x01 || sr || c).
        else:
            sr = HASH(b"\x01" + sr + c)
        # c. Finally, right-shift both fn and sn one time.
        fn, sn = fn >> 1, sn >> 1
    # 7. ... verify that the fr calculated is equal to the first_hash supplied, that the sr
    #    calculated is equal to the second_hash value supplied, and that sn is 0.
    return fr == first_hash and sr == second_hash and sn == 0
