"""AES-128 in pure Python, written from FIPS-197 (no third-party code), plus CTR mode (SP 800-38A).

The S-box is derived at import time from its definition (multiplicative inverse in GF(2^8)
followed by the affine transformation), and the implementation is checked against the
FIPS-197 and SP 800-38A known-answer vectors before the module finishes importing.
"""


def _xtime(a):
    a <<= 1
    return (a ^ 0x11B) if a & 0x100 else a


def _gmul(a, b):
    r = 0
    while b:
        if b & 1:
            r ^= a
        a = _xtime(a)
        b >>= 1
    return r


def _make_sbox():
    sbox = [0] * 256
    for x in range(256):
        inv = 0
        if x:
            # x^254 == x^-1 in GF(2^8)
            inv, base, e = 1, x, 254
            while e:
                if e & 1:
                    inv = _gmul(inv, base)
                base = _gmul(base, base)
                e >>= 1
        s = inv
        for shift in (1, 2, 3, 4):  # b ^ rotl(b,1) ^ rotl(b,2) ^ rotl(b,3) ^ rotl(b,4) ^ 0x63
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        sbox[x] = s ^ 0x63
    return sbox


SBOX = _make_sbox()
MUL2 = [_gmul(x, 2) for x in range(256)]
MUL3 = [_gmul(x, 3) for x in range(256)]
# (column index, row) -> index into the 16-byte state after ShiftRows; state is column-major:
# byte r + 4c is row r of column c, and ShiftRows moves row r left by r columns.
_SHIFT = [((c + r) % 4) * 4 + r for c in range(4) for r in range(4)]


def expand_key(key):
    """FIPS-197 5.2 KeyExpansion for Nk=4, Nr=10: returns 11 round keys of 16 bytes."""
    if len(key) != 16:
        raise ValueError("AES-128 needs a 16-byte key")
    w = [list(key[i:i + 4]) for i in range(0, 16, 4)]
    rcon = 1
    for i in range(4, 44):
        t = list(w[i - 1])
        if i % 4 == 0:
            t = t[1:] + t[:1]                       # RotWord
            t = [SBOX[b] for b in t]                # SubWord
            t[0] ^= rcon
            rcon = _xtime(rcon)
        w.append([a ^ b for a, b in zip(w[i - 4], t)])
    return [sum(w[4 * r:4 * r + 4], []) for r in range(11)]


def encrypt_block(round_keys, block):
    """FIPS-197 5.1 Cipher: one 16-byte block."""
    sbox, mul2, mul3, shift = SBOX, MUL2, MUL3, _SHIFT
    s = [b ^ k for b, k in zip(block, round_keys[0])]          # AddRoundKey
    for rnd in range(1, 10):
        t = [sbox[s[i]] for i in shift]                           # SubBytes + ShiftRows
        k = round_keys[rnd]
        out = [0] * 16
        for c in range(0, 16, 4):                                 # MixColumns + AddRoundKey
            a0, a1, a2, a3 = t[c], t[c + 1], t[c + 2], t[c + 3]
            out[c] = mul2[a0] ^ mul3[a1] ^ a2 ^ a3 ^ k[c]
            out[c + 1] = a0 ^ mul2[a1] ^ mul3[a2] ^ a3 ^ k[c + 1]
            out[c + 2] = a0 ^ a1 ^ mul2[a2] ^ mul3[a3] ^ k[c + 2]
            out[c + 3] = mul3[a0] ^ a1 ^ a2 ^ mul2[a3] ^ k[c + 3]
        s = out
    k = round_keys[10]
    return bytes(sbox[s[i]] ^ k[j] for j, i in enumerate(shift))  # final round: no MixColumns


def ctr_encrypt(key, counter_block, data):
    """SP 800-38A CTR mode; the counter is the whole 128-bit block, incremented big-endian."""
    rk = expand_key(key)
    ctr = int.from_bytes(counter_block, "big")
    out = bytearray()
    for off in range(0, len(data), 16):
        ks = encrypt_block(rk, ctr.to_bytes(16, "big"))
        chunk = data[off:off + 16]
        out += bytes(a ^ b for a, b in zip(chunk, ks))
        ctr = (ctr + 1) & ((1 << 128) - 1)
    return bytes(out)


def _self_test():
    h = bytes.fromhex
    assert SBOX[0x00] == 0x63 and SBOX[0x53] == 0xED and SBOX[0xFF] == 0x16, "S-box"
    # FIPS-197 Appendix C.1 (AES-128) and Appendix B (cipher example)
    vectors = [("000102030405060708090a0b0c0d0e0f", "00112233445566778899aabbccddeeff",
                "69c4e0d86a7b0430d8cdb78070b4c55a"),
               ("2b7e151628aed2a6abf7158809cf4f3c", "3243f6a8885a308d313198a2e0370734",
                "3925841d02dc09fbdc118597196a0b32")]
    for key, pt, ct in vectors:
        got = encrypt_block(expand_key(h(key)), h(pt))
        if got != h(ct):
            raise AssertionError("AES-128 known-answer test failed: %s != %s" % (got.hex(), ct))
    # SP 800-38A F.5.1 CTR-AES128.Encrypt, first two blocks
    got = ctr_encrypt(h("2b7e151628aed2a6abf7158809cf4f3c"), h("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"),
                      h("6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"))
    if got != h("874d6191b620e3261bef6864990db6ce" "9806f66b7970fdff8617187bb9fffdff"):
        raise AssertionError("AES-128-CTR known-answer test failed: %s" % got.hex())


_self_test()
